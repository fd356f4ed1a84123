"""CPU checks of the fidelity harness (benchmarks/fidelity.py): the bounds it compares
really bound q.k, selection keeps the budget, and the metrics read 1 / 0 where they must."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fidelity  # noqa: E402
from hydra.policy import HydraPolicy  # noqa: E402


def _inputs(T=640, seed=0):
    return fidelity.synthetic_layer(1, 8, 2, T, 128, seed=seed, device="cpu")


@pytest.mark.parametrize("scorer", ["quest_sum", "centre_radius", "group_max", "mean_spread", "quest_sum_fp8",
                                    "quest_sum_int8"])
def test_scores_are_finite_and_bounds_hold(scorer):
    q, k, _ = _inputs()
    P = 16
    s = fidelity.page_scores(scorer, q, k, P)
    assert s.shape == (1, 2, 40) and torch.isfinite(s).all()
    qk = torch.einsum("bhgd,bhtd->bhgt", q.float().view(1, 2, 4, 128), k.float()).view(1, 2, 4, 40, P)
    per_head_max = qk.amax(-1)                                   # (1, 2, 4, n)
    if scorer in ("quest_sum", "centre_radius", "quest_sum_fp8", "quest_sum_int8"):  # bounds on sum_j max_t q_j.k_t
        assert (s + 1e-2 >= per_head_max.sum(2)).all()
    if scorer == "group_max":                                    # an upper bound on max_j max_t q_j.k_t
        assert (s + 1e-2 >= per_head_max.amax(2)).all()


@pytest.mark.parametrize("scorer", ["quest_sum_fp8", "quest_sum_int8"])
def test_quantized_summaries_round_outward(scorer):
    """The quantized summaries contain the exact ones (min down, max up), so their bound is
    never below the bf16 bound, and they stay close to it."""
    q, k, _ = _inputs()
    summ = fidelity.ref.page_summaries(k, page_size=8).float()
    kmin, kmax = summ[..., 0, :], summ[..., 1, :]
    if scorer == "quest_sum_fp8":  # the shipped rule (hydra.reference), as the harness scores it
        lo, hi = (t.float() for t in fidelity.ref.e4m3_round_outward(kmin, kmax))
    else:
        lo, hi = fidelity.int8_outward(kmin, kmax)
    assert (lo <= kmin).all() and (hi >= kmax).all()
    exact = fidelity.page_scores("quest_sum", q, k, 8)
    quant = fidelity.page_scores(scorer, q, k, 8)
    assert (quant >= exact - 1e-3 * exact.abs()).all()
    assert ((quant - exact) / exact.abs()).median() < 0.15


def test_selection_keeps_the_budget_and_forced_pages():
    q, k, _ = _inputs()
    pol = HydraPolicy(page_size=16, budget_tokens=256, sink_tokens=32, recent_tokens=64)
    sel = fidelity.select_from_scores(fidelity.page_scores("quest_sum", q, k, 16), 640, pol)
    assert (sel.sum(-1) == pol.n_sel).all()
    assert sel[..., :2].all() and sel[..., 36:].all()
    floor = fidelity.select_from_scores(fidelity.page_scores("streaming", q, k, 16), 640, pol)
    assert (floor.sum(-1) == pol.n_sel).all() and floor[..., :2].all() and floor[..., 40 - 14:].all()


def test_metrics_exact_under_budget_and_floor_below_scorers():
    q, k, v = _inputs()
    exact = fidelity.fidelity_metrics(q, k, v, "quest_sum", HydraPolicy(budget_tokens=1024))
    assert torch.allclose(exact["mass_recall"], torch.ones(1, 2), atol=1e-5)
    assert (exact["rel_err"] < 1e-5).all() and (exact["top10_recall"] == 1).all()
    pol = HydraPolicy(page_size=16, budget_tokens=256, sink_tokens=32, recent_tokens=64)
    quest = fidelity.fidelity_metrics(q, k, v, "quest_sum", pol)
    floor = fidelity.fidelity_metrics(q, k, v, "streaming", pol)
    assert (quest["mass_recall"] > floor["mass_recall"]).all()   # the planted needles are found
    assert math.isclose(quest["metadata_bytes"], 1 * 2 * 40 * 2 * 128 * 2)


def test_coarse_to_fine_in_the_harness(monkeypatch):
    """quest_sum_c2f keeps the budget, reads less metadata than flat quest_sum at a long
    context, and with a shortlist covering every superpage selects exactly like it."""
    q, k, v = _inputs(T=8192, seed=3)
    pol = HydraPolicy(page_size=8, budget_tokens=512, sink_tokens=64, recent_tokens=128)
    flat = fidelity.fidelity_metrics(q, k, v, "quest_sum", pol)
    c2f = fidelity.fidelity_metrics(q, k, v, "quest_sum_c2f", pol)
    assert c2f["metadata_bytes"] < flat["metadata_bytes"]
    assert (c2f["mass_recall"] <= 1 + 1e-6).all() and (c2f["mass_recall"] > 0).all()
    wide = pol.__class__(page_size=8, budget_tokens=512, sink_tokens=64, recent_tokens=128)
    monkeypatch.setattr(fidelity, "C2F_SHORTLIST", 1000)
    same = fidelity.fidelity_metrics(q, k, v, "quest_sum_c2f", wide)
    assert torch.equal(same["mass_recall"], flat["mass_recall"])


def test_mean_fp8_scores_are_the_group_query_on_each_pages_mean():
    """mean_fp8 scores every page, the partial last one included, with the group's summed
    query dotted with the mean of its valid keys, to e4m3's rounding of that mean."""
    q, k, _ = _inputs(T=650, seed=5)
    P = 16
    s = fidelity.page_scores("mean_fp8", q, k, P)
    assert s.shape == (1, 2, 41) and torch.isfinite(s).all()
    qs = q.double().view(1, 2, 4, 128).sum(2)                    # (1, 2, D)
    for page in (0, 17, 40):                                     # page 40 holds 10 keys
        mu = k.double()[:, :, page * P:min((page + 1) * P, 650)].mean(2)
        want = (qs * mu).sum(-1)
        tol = (qs.abs() * mu.abs()).sum(-1) * 2 ** -4 + 1e-6     # e4m3: 3 mantissa bits, to nearest
        assert ((s[..., page].double() - want).abs() <= tol).all()


def test_mean_shortlist_then_quest(monkeypatch):
    """mean_fp8_quest keeps the budget and the forced pages, shortlists only candidate
    pages, reads every page's e4m3 mean plus the shortlisted bf16 summaries, and with a
    shortlist covering every candidate selects exactly like quest_sum."""
    q, k, v = _inputs(T=8192, seed=3)
    pol = HydraPolicy(page_size=8, budget_tokens=512, sink_tokens=64, recent_tokens=128)
    n = 1024
    short = fidelity.mean_shortlist(fidelity.page_scores("mean_fp8", q, k, 8), 8192, pol, 2 * pol.n_sel)
    assert (short.sum(-1) == 2 * pol.n_sel).all()
    assert not short[..., :pol.sink_pages].any() and not short[..., n - 128 // 8:].any()
    quest = fidelity.page_scores("quest_sum", q, k, 8)
    pages = fidelity.select_from_scores(torch.where(short, quest, -math.inf), 8192, pol)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[:pol.sink_pages] = True
    forced[n - 128 // 8:] = True
    assert (pages.sum(-1) == pol.n_sel).all() and pages[..., forced].all()
    assert not (pages & ~short & ~forced).any()                  # chosen pages come from the shortlist
    m = fidelity.fidelity_metrics(q, k, v, "mean_fp8_quest", pol)
    assert m["metadata_bytes"] == 1 * 2 * (n * 128 + 2 * pol.n_sel * 4 * 128)
    flat = fidelity.fidelity_metrics(q, k, v, "quest_sum", pol)
    assert m["metadata_bytes"] < flat["metadata_bytes"]
    monkeypatch.setattr(fidelity, "MEAN_SHORTLIST", 1000)
    same = fidelity.fidelity_metrics(q, k, v, "mean_fp8_quest", pol)
    assert torch.equal(same["mass_recall"], flat["mass_recall"])
    assert torch.equal(same["top10_recall"], flat["top10_recall"])


def test_smooth_keys_are_locally_correlated():
    """--smooth: neighbouring keys correlate (and far ones do not), keys keep unit scale,
    and the needles are still planted whole; smooth=0 draws exactly the default inputs."""
    q, k, _ = fidelity.synthetic_layer(1, 8, 2, 4096, 128, seed=7, device="cpu", n_needles=4, strength=1.0,
                                       smooth=8)
    kf = k.float()[0, 0]
    def corr(a, b):
        return torch.nn.functional.cosine_similarity(a - a.mean(), b - b.mean(), dim=-1).mean().item()
    assert corr(kf[:-1], kf[1:]) > 0.6 and abs(corr(kf[:-64], kf[64:])) < 0.1
    assert 0.9 < kf.std().item() < 1.1
    qbar = q.float().view(1, 2, 4, 128).mean(2)[0, 0]
    cos = torch.nn.functional.cosine_similarity(kf, qbar.view(1, -1), dim=-1)
    assert int((cos > 0.99).sum()) == 4                          # the 4 needles, nothing else near
    plain = fidelity.synthetic_layer(1, 8, 2, 4096, 128, seed=7, device="cpu", n_needles=4, strength=1.0)
    again = fidelity.synthetic_layer(1, 8, 2, 4096, 128, seed=7, device="cpu", n_needles=4, strength=1.0, smooth=0)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))


def test_mean_spread_is_the_bound_of_the_box_mean_plus_minus_sigma():
    """mean_spread's score, sum_j (q_j . mu + sum_d |q_jd| sigma_d), is the kernels' bound
    over the box (mu - sigma, mu + sigma), so the kernels can select by it from such
    summaries (README, Fidelity)."""
    q, k, _ = _inputs(T=640, seed=11)
    P = 16
    want = fidelity.page_scores("mean_spread", q, k, P)
    kp = k.float().view(1, 2, 40, P, 128)
    mu, sd = kp.mean(3), kp.var(3, unbiased=False).sqrt()
    box = torch.stack([mu - sd, mu + sd], dim=3)
    got = fidelity.ref.page_scores(q, box, page_size=P)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
