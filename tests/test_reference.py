"""Semantic tests of hydra.reference (CPU, fast).

The truth here is written out plainly in float64 inside this file (dense
softmax attention over an explicit token mask, Quest bounds by a loop over
pages), so a reference bug cannot hide behind a shared helper.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

_TORCH_EXT = str(Path(__file__).resolve().parents[1] / "torch-ext")
if _TORCH_EXT not in sys.path:
    sys.path.insert(0, _TORCH_EXT)

from hydra import reference as ref  # noqa: E402
from hydra.policy import HydraPolicy  # noqa: E402

# Small policy so that sparse selection shows up at cheap lengths:
# pages of 8, 2 sink pages, a recent window that straddles pages, 16 pages of budget.
SMALL = HydraPolicy(page_size=8, sink_tokens=16, recent_tokens=40, budget_tokens=128)
# Block-level prefill policy: blocks of 16, budget of 8 blocks.
PREFILL = HydraPolicy(page_size=16, sink_tokens=16, recent_tokens=32, budget_tokens=128, block_size=16)

GROUPS = [(4, 4), (8, 2), (8, 1), (16, 2)]  # GQA groups 1 (MHA), 4, 8 (MQA), 8
GROUP_IDS = ["mha", "g4", "mqa8", "g8"]


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(B, Hq, Hkv, Tq, Tkv, D, seed, dtype=torch.float32):
    return (randn(B, Hq, Tq, D, seed=seed, dtype=dtype),
            randn(B, Hkv, Tkv, D, seed=seed + 1, dtype=dtype),
            randn(B, Hkv, Tkv, D, seed=seed + 2, dtype=dtype))


def dense64(q, k, v, mask=None, scale=None):
    """Plain float64 attention. mask: bool broadcastable to (B, Hkv, Tq, Tkv) or None."""
    B, Hq, Tq, D = q.shape
    Hkv, Tkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    k64 = k.double().repeat_interleave(G, dim=1)
    v64 = v.double().repeat_interleave(G, dim=1)
    if mask is None:
        mask = torch.ones(Tkv, dtype=torch.bool)
    mask = mask.expand(B, Hkv, Tq, Tkv).repeat_interleave(G, dim=1)
    k64 = torch.where(mask.any(dim=2, keepdim=True).transpose(-1, -2), k64, 0.0)
    v64 = torch.where(mask.any(dim=2, keepdim=True).transpose(-1, -2), v64, 0.0)
    s = (q.double() @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v64, torch.logsumexp(s, dim=-1)


def length_mask(L, Tkv):
    """(B, 1, 1, Tkv) bool: positions < L_b."""
    return (torch.arange(Tkv).view(1, -1) < L.view(-1, 1)).view(-1, 1, 1, Tkv)


def quest64(q, k, L, P):
    """(B, Hkv, n_pages) float64 Quest bound, one page at a time; -inf past L."""
    B, Hq, _, D = q.shape
    Hkv, Tkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n_pages = -(-Tkv // P)
    out = torch.full((B, Hkv, n_pages), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for p in range(n_pages):
            end = min((p + 1) * P, int(L[b]))
            if p * P >= end:
                continue
            kp = k[b, :, p * P:end].double()  # (Hkv, n, D)
            kmin, kmax = kp.amin(dim=1), kp.amax(dim=1)
            for h in range(Hkv):
                qg = q[b, h * G:(h + 1) * G, 0].double()  # (G, D)
                out[b, h, p] = torch.maximum(qg * kmin[h], qg * kmax[h]).sum()
    return out


def close(a, b, atol=2e-5, rtol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- #
# Decode: exact cases                                                         #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("Hq,Hkv", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("Tkv", [1, 15, 17, 97])
def test_under_budget_is_dense(Hq, Hkv, Tkv):
    q, k, v = qkv(2, Hq, Hkv, 1, Tkv, 64, seed=Tkv * 10 + Hkv)
    out, lse = ref.hydra(q, k, v, return_lse=True)
    want, want_lse = dense64(q, k, v)
    close(out, want)
    close(lse, want_lse)
    pages = ref.select_pages(q, k)
    n_pages = -(-Tkv // 16)
    assert pages.shape == (2, Hkv, 256) and pages.dtype == torch.int32
    assert pages[..., :n_pages].tolist() == [[list(range(n_pages))] * Hkv] * 2
    assert (pages[..., n_pages:] == -1).all()


@pytest.mark.parametrize("Hq,Hkv", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("Tkv", [300, 4097])
def test_precision_exact_is_dense_at_any_length(Hq, Hkv, Tkv):
    q, k, v = qkv(1, Hq, Hkv, 1, Tkv, 32, seed=Tkv + Hq)
    out = ref.hydra(q, k, v, precision="exact", policy=SMALL)
    close(out, dense64(q, k, v)[0])
    # Same inputs under the sparse policy really are sparse: the check above can fail.
    assert (ref.hydra(q, k, v, policy=SMALL) - out).abs().max() > 1e-3
    pages = ref.select_pages(q, k, precision="exact", policy=SMALL)
    n_pages = -(-Tkv // 8)
    assert pages.shape == (1, Hkv, n_pages)
    assert (pages == torch.arange(n_pages, dtype=torch.int32)).all()


def test_dense_layers_rule():
    q, k, v = qkv(2, 8, 2, 1, 300, 32, seed=7)
    dense = dense64(q, k, v)[0]
    for layer in (0, 1):
        close(ref.hydra(q, k, v, policy_layer_idx=layer, policy=SMALL), dense)
        assert ref.select_pages(q, k, policy_layer_idx=layer, policy=SMALL).shape == (2, 2, 38)
    sparse = ref.hydra(q, k, v, policy=SMALL)
    assert (sparse - dense).abs().max() > 1e-3
    close(ref.hydra(q, k, v, policy_layer_idx=2, policy=SMALL), sparse, atol=0, rtol=0)
    assert ref.select_pages(q, k, policy_layer_idx=2, policy=SMALL).shape == (2, 2, 16)
    # dense_layers is a policy field
    pol = HydraPolicy(page_size=8, sink_tokens=16, recent_tokens=40, budget_tokens=128, dense_layers=3)
    close(ref.hydra(q, k, v, policy_layer_idx=2, policy=pol), dense)


# --------------------------------------------------------------------------- #
# Decode: selection                                                           #
# --------------------------------------------------------------------------- #

POLICIES = [
    SMALL,
    HydraPolicy(page_size=16, sink_tokens=0, recent_tokens=0, budget_tokens=64),
    HydraPolicy(page_size=16, sink_tokens=20, recent_tokens=33, budget_tokens=160),
    HydraPolicy(page_size=64, sink_tokens=64, recent_tokens=64, budget_tokens=512),
]


@pytest.mark.parametrize("pol", POLICIES, ids=["small", "no_sink_recent", "odd", "p64"])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 4)], ids=["g4", "mha"])
def test_selection_structure_and_score_order(pol, Hq, Hkv):
    Tkv = 1100
    L = torch.tensor([1100, 517, 129, 64, 1], dtype=torch.int32)
    q, k, _ = qkv(5, Hq, Hkv, 1, Tkv, 32, seed=pol.page_size + Hq)
    pages = ref.select_pages(q, k, policy=pol, cache_seqlens=L)
    P, n_sel = pol.page_size, pol.budget_tokens // pol.page_size
    assert pages.shape == (5, Hkv, n_sel) and pages.dtype == torch.int32
    want_scores = quest64(q, k, L, P)
    close(ref.page_scores(q, ref.page_summaries(k, page_size=P, cache_seqlens=L),
                          cache_seqlens=L, page_size=P), want_scores.float(), rtol=1e-5, atol=1e-3)
    n_sparse_rows = 0
    for b in range(5):
        Lb = int(L[b])
        n_valid = -(-Lb // P)
        for h in range(Hkv):
            row = pages[b, h].tolist()
            chosen = [p for p in row if p >= 0]
            assert row == chosen + [-1] * (n_sel - len(chosen)), "padding must be at the end"
            assert chosen == sorted(set(chosen)), "ascending, no duplicates"
            assert all(0 <= p < n_valid for p in chosen)
            if Lb <= pol.budget_tokens:
                assert chosen == list(range(n_valid))
                continue
            n_sparse_rows += 1
            assert len(chosen) == n_sel
            sink = set(range(-(-pol.sink_tokens // P)))
            recent = {t // P for t in range(max(0, Lb - pol.recent_tokens), Lb)}
            assert sink <= set(chosen) and recent <= set(chosen)
            scored = set(chosen) - sink - recent
            unchosen = set(range(n_valid)) - set(chosen)
            assert len(scored) == n_sel - len(sink | recent)
            s = want_scores[b, h].tolist()
            lo = min(s[p] for p in scored)
            hi = max(s[p] for p in unchosen)
            assert lo >= hi - 1e-3 * abs(hi), f"chosen score {lo} below unchosen {hi}"
    assert n_sparse_rows >= Hkv  # the loop above did test sparse rows


def test_ties_go_to_lower_page_index():
    P = 8
    base = randn(1, 2, P, 32, seed=3)
    k = base.repeat(1, 1, 40, 1)  # every page has the same summary -> equal scores
    q = randn(1, 8, 1, 32, seed=4)
    pages = ref.select_pages(q, k, policy=SMALL)
    forced = set(range(2)) | {t // P for t in range(320 - 40, 320)}
    k_top = 16 - len(forced)
    candidates = [p for p in range(40) if p not in forced]
    want = sorted(forced | set(candidates[:k_top]))
    assert pages[0, 0].tolist() == want and pages[0, 1].tolist() == want


@pytest.mark.parametrize("Hq,Hkv", GROUPS, ids=GROUP_IDS)
def test_needle_page_is_selected(Hq, Hkv):
    G = Hq // Hkv
    Tkv, D, P = 2000, 64, 8
    for seed in range(4):
        q, k, _ = qkv(1, Hq, Hkv, 1, Tkv, D, seed=100 + seed)
        gen = torch.Generator().manual_seed(seed)
        needles = []
        for h in range(Hkv):
            # a middle page: neither sink nor recent
            page = int(torch.randint(4, Tkv // P - 10, (1,), generator=gen))
            tok = page * P + int(torch.randint(0, P, (1,), generator=gen))
            qbar = q[0, h * G:(h + 1) * G, 0].mean(dim=0)
            k[0, h, tok] = 6.0 * qbar / qbar.norm() * math.sqrt(D)
            needles.append(page)
        pages = ref.select_pages(q, k, policy=SMALL)
        for h in range(Hkv):
            assert needles[h] in pages[0, h].tolist(), f"seed {seed} head {h}: needle page {needles[h]} missed"


def test_hydra_decode_is_sparse_attention_of_select_pages():
    q, k, v = qkv(2, 16, 2, 1, 4097, 32, seed=11)
    L = torch.tensor([4097, 4000], dtype=torch.int32)
    pages = ref.select_pages(q, k, cache_seqlens=L)
    assert pages.shape == (2, 2, 256)
    assert (pages[0] >= 0).all()  # L > budget: the list is full
    assert (pages[1, :, :250] == torch.arange(250)).all() and (pages[1, :, 250:] == -1).all()  # L <= budget
    out = ref.hydra(q, k, v, cache_seqlens=L)
    close(out, ref.sparse_attention(q, k, v, pages, cache_seqlens=L), atol=0, rtol=0)
    mask = ref.attended_token_mask(q, k, cache_seqlens=L)
    assert mask.shape == (2, 2, 4097) and (mask.sum(-1) <= 4096).all()
    close(out, dense64(q, k, v, mask.unsqueeze(2))[0])
    # passing the summaries gives the same result
    summ = ref.page_summaries(k, cache_seqlens=L)
    close(ref.hydra(q, k, v, cache_seqlens=L, page_summaries=summ), out, atol=0, rtol=0)


# --------------------------------------------------------------------------- #
# Sliding window                                                              #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("W", [1, 7, 16, 50, 5000])
def test_sliding_window_decode(W):
    q, k, v = qkv(3, 8, 2, 1, 400, 32, seed=W)
    L = torch.tensor([400, 123, 5], dtype=torch.int32)
    pos = torch.arange(400).view(1, -1)
    win = ((pos < L.view(-1, 1)) & (pos >= (L.view(-1, 1) - W))).view(3, 1, 1, 400)
    want = dense64(q, k, v, win)[0]
    for kwargs in ({}, {"precision": "exact"}, {"policy_layer_idx": 0}, {"policy": SMALL}):
        close(ref.hydra(q, k, v, sliding_window=W, cache_seqlens=L, **kwargs), want)
    mask = ref.attended_token_mask(q, k, sliding_window=W, cache_seqlens=L)
    assert (mask == win.view(3, 1, 400)).all()


@pytest.mark.parametrize("W", [1, 20, 64, 100, 1000])
def test_sliding_window_prefill(W):
    q, k, v = qkv(1, 8, 2, 192, 192, 32, seed=W)
    i = torch.arange(192).view(-1, 1)
    j = torch.arange(192).view(1, -1)
    want = dense64(q, k, v, (j <= i) & (j > i - W))[0]
    close(ref.hydra(q, k, v, sliding_window=W), want)
    close(ref.hydra(q, k, v, sliding_window=W, policy=PREFILL), want)


# --------------------------------------------------------------------------- #
# cache_seqlens                                                               #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("kwargs", [{}, {"precision": "exact"}, {"sliding_window": 30}],
                         ids=["sparse", "exact", "window"])
def test_positions_past_L_never_matter(kwargs):
    Tkv = 600
    L = torch.tensor([600, 333, 97, 129], dtype=torch.int32)
    q, k, v = qkv(4, 8, 2, 1, Tkv, 32, seed=5)
    beyond = (torch.arange(Tkv).view(1, 1, -1, 1) >= L.view(-1, 1, 1, 1))
    k_nan = k.masked_fill(beyond, float("nan"))
    v_nan = v.masked_fill(beyond, float("nan"))
    k_big = torch.where(beyond, 1e4 * randn(*k.shape, seed=6), k)
    v_big = torch.where(beyond, 1e4 * randn(*v.shape, seed=7), v)
    out_nan, lse_nan = ref.hydra(q, k_nan, v_nan, policy=SMALL, cache_seqlens=L, return_lse=True, **kwargs)
    out_big, lse_big = ref.hydra(q, k_big, v_big, policy=SMALL, cache_seqlens=L, return_lse=True, **kwargs)
    assert torch.isfinite(out_nan).all() and torch.isfinite(lse_nan).all()
    close(out_nan, out_big, atol=0, rtol=0)
    close(lse_nan, lse_big, atol=0, rtol=0)
    for b in range(4):
        Lb = int(L[b])
        sl = (q[b:b + 1], k[b:b + 1, :, :Lb], v[b:b + 1, :, :Lb])
        out_b, lse_b = ref.hydra(*sl, policy=SMALL, return_lse=True, **kwargs)
        close(out_nan[b:b + 1], out_b, atol=1e-6, rtol=1e-6)
        close(lse_nan[b:b + 1], lse_b, atol=1e-6, rtol=1e-6)
        if not kwargs:
            full = ref.select_pages(q, k_nan, policy=SMALL, cache_seqlens=L)[b:b + 1]
            assert (full == ref.select_pages(q[b:b + 1], sl[1], policy=SMALL)).all()


@pytest.mark.parametrize("kwargs", [{}, {"precision": "exact"}, {"sliding_window": 30}],
                         ids=["sparse", "exact", "window"])
def test_left_padding_is_cut_off(kwargs):
    """cache_leftpad: positions before the padding end never matter, and the result is
    that of each sequence with its padding cut off (pages, sinks and windows count from
    the first valid token)."""
    Tkv = 600
    L = torch.tensor([600, 333, 590, 129], dtype=torch.int32)
    pad = torch.tensor([0, 100, 7, 128], dtype=torch.int32)
    q, k, v = qkv(4, 8, 2, 1, Tkv, 32, seed=8)
    pos = torch.arange(Tkv).view(1, 1, -1, 1)
    outside = (pos < pad.view(-1, 1, 1, 1)) | (pos >= L.view(-1, 1, 1, 1))
    k_nan, v_nan = k.masked_fill(outside, float("nan")), v.masked_fill(outside, float("nan"))
    out, lse = ref.hydra(q, k_nan, v_nan, policy=SMALL, cache_seqlens=L, cache_leftpad=pad, return_lse=True,
                         **kwargs)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    mask = ref.attended_token_mask(q, k_nan, policy=SMALL, cache_seqlens=L, cache_leftpad=pad, **kwargs)
    assert not (mask & outside.squeeze(-1)).any()
    for b in range(4):
        lo, hi = int(pad[b]), int(L[b])
        sl = (q[b:b + 1], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi])
        out_b, lse_b = ref.hydra(*sl, policy=SMALL, return_lse=True, **kwargs)
        close(out[b:b + 1], out_b, atol=1e-6, rtol=1e-6)
        close(lse[b:b + 1], lse_b, atol=1e-6, rtol=1e-6)
        assert torch.equal(mask[b, :, lo:hi], ref.attended_token_mask(q[b:b + 1], sl[1], policy=SMALL,
                                                                      **kwargs)[0])
        if not kwargs:
            pages = ref.select_pages(q, k_nan, policy=SMALL, cache_seqlens=L, cache_leftpad=pad)[b:b + 1]
            assert torch.equal(pages, ref.select_pages(q[b:b + 1], sl[1], policy=SMALL))
    summ = ref.page_summaries(k_nan, page_size=16, cache_seqlens=L, cache_leftpad=pad)
    assert torch.equal(summ[1:2, :, :15], ref.page_summaries(k[1:2, :, 100:333], page_size=16))
    with pytest.raises(ValueError, match="cache_leftpad values must lie in"):
        ref.hydra(q, k, v, cache_seqlens=L, cache_leftpad=L)


def test_page_summaries_values():
    P = 16
    k = randn(2, 3, 97, 24, seed=9, dtype=torch.bfloat16)
    L = torch.tensor([97, 40], dtype=torch.int32)
    k_poison = k.clone()
    k_poison[1, :, 40:] = float("nan")
    s = ref.page_summaries(k_poison, page_size=P, cache_seqlens=L)
    assert s.shape == (2, 3, 7, 2, 24) and s.dtype == torch.bfloat16
    for b in range(2):
        for p in range(7):
            end = min((p + 1) * P, int(L[b]))
            if p * P >= end:
                assert (s[b, :, p, 0] == float("inf")).all() and (s[b, :, p, 1] == float("-inf")).all()
            else:
                assert torch.equal(s[b, :, p, 0], k[b, :, p * P:end].amin(dim=1))
                assert torch.equal(s[b, :, p, 1], k[b, :, p * P:end].amax(dim=1))
    # the last page of b=0 is partial (tokens 96..96): min == max == that token
    assert torch.equal(s[0, :, 6, 0], k[0, :, 96]) and torch.equal(s[0, :, 6, 1], k[0, :, 96])


def test_page_scores_mask_empty_pages():
    q, k, _ = qkv(2, 8, 2, 1, 100, 32, seed=12)
    L = torch.tensor([100, 33], dtype=torch.int32)
    # summaries from the full k are stale past L: cache_seqlens must still mask them
    stale = ref.page_summaries(k, page_size=16)
    sc = ref.page_scores(q, stale, cache_seqlens=L, page_size=16)
    assert sc.dtype == torch.float32 and sc.shape == (2, 2, 7)
    assert torch.isneginf(sc[1, :, 3:]).all() and torch.isfinite(sc[1, :, :3]).all()
    assert torch.isfinite(sc[0]).all()
    # empty summaries (min=+inf, max=-inf) also score -inf without cache_seqlens
    sc2 = ref.page_scores(q, ref.page_summaries(k, page_size=16, cache_seqlens=L))
    assert torch.isneginf(sc2[1, :, 3:]).all()
    close(sc2, quest64(q, k, L, 16).float(), rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------- #
# sparse_attention                                                            #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("Hq,Hkv", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("Tkv", [1, 17, 97])
def test_every_page_listed_is_dense(Hq, Hkv, Tkv):
    P = 16
    n_pages = -(-Tkv // P)
    q, k, v = qkv(2, Hq, Hkv, 1, Tkv, 64, seed=Tkv + 3)
    L = torch.tensor([Tkv, max(1, Tkv // 2)], dtype=torch.int32)
    gen = torch.Generator().manual_seed(Tkv)
    rows = [torch.cat([torch.randperm(n_pages, generator=gen), torch.tensor([-1, 0, n_pages - 1])])
            for _ in range(2 * Hkv)]
    pages = torch.stack(rows).view(2, Hkv, n_pages + 3).to(torch.int32)
    out, lse = ref.sparse_attention(q, k, v, pages, cache_seqlens=L, return_lse=True, page_size=P)
    want, want_lse = dense64(q, k, v, length_mask(L, Tkv))
    close(out, want)
    close(lse, want_lse)


def test_duplicate_and_padding_entries():
    q, k, v = qkv(1, 8, 2, 1, 50, 32, seed=21)
    messy = torch.tensor([[[3, 3, -1, 1, -1], [-1, -1, 0, 0, 0]]], dtype=torch.int32)
    clean = torch.tensor([[[1, 3], [0, -1]]], dtype=torch.int32)
    out_m, lse_m = ref.sparse_attention(q, k, v, messy, return_lse=True)
    out_c, lse_c = ref.sparse_attention(q, k, v, clean, return_lse=True)
    close(out_m, out_c, atol=0, rtol=0)
    close(lse_m, lse_c, atol=0, rtol=0)
    pos = torch.arange(50)
    mask = torch.stack([(pos // 16 == 1) | (pos // 16 == 3), pos // 16 == 0]).view(1, 2, 1, 50)
    want, want_lse = dense64(q, k, v, mask)
    close(out_m, want)
    close(lse_m, want_lse)
    # page 3 holds only tokens 48, 49: with L = 40 it contributes nothing
    L = torch.tensor([40], dtype=torch.int32)
    out_L = ref.sparse_attention(q, k, v, messy, cache_seqlens=L)
    close(out_L, dense64(q, k, v, mask & (pos < 40))[0])


def test_nothing_listed_gives_zero_and_neg_inf_lse():
    q, k, v = qkv(1, 4, 2, 1, 40, 16, seed=22)
    pages = torch.tensor([[[-1, -1], [2, -1]]], dtype=torch.int32)
    L = torch.tensor([30], dtype=torch.int32)  # page 2 starts at 32: empty
    out, lse = ref.sparse_attention(q, k, v, pages, cache_seqlens=L, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_sparse_attention_rejects_bad_pages():
    q, k, v = qkv(1, 4, 2, 1, 40, 16, seed=23)
    with pytest.raises(ValueError, match="pages"):
        ref.sparse_attention(q, k, v, torch.tensor([[[3], [0]]], dtype=torch.int32))
    with pytest.raises(ValueError, match="pages"):
        ref.sparse_attention(q, k, v, torch.tensor([[[-2], [0]]], dtype=torch.int32))
    with pytest.raises(ValueError, match="pages"):
        ref.sparse_attention(q, k, v, torch.zeros(1, 3, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="pages"):
        ref.sparse_attention(q, k, v, torch.zeros(1, 2, 1))


def test_return_lse_matches_logsumexp():
    q, k, v = qkv(2, 16, 2, 1, 4097, 32, seed=31)
    scale = 0.3
    out, lse = ref.hydra(q, k, v, precision="fast", return_lse=True, scale=scale)
    assert lse.shape == (2, 16, 1) and lse.dtype == torch.float32 and out.dtype == torch.float32
    mask = ref.attended_token_mask(q, k, precision="fast")
    assert (mask.sum(-1) < 4097).all()
    s = (q.double() @ k.double().repeat_interleave(8, dim=1).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.repeat_interleave(8, dim=1).unsqueeze(2), float("-inf"))
    close(lse, torch.logsumexp(s, dim=-1), atol=1e-5, rtol=1e-6)
    close(out, dense64(q, k, v, mask.unsqueeze(2), scale=scale)[0])


# --------------------------------------------------------------------------- #
# Dtypes, head dims, out=                                                     #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 96, 128, 256])
def test_low_precision_inputs_any_head_dim(dtype, D):
    q, k, v = qkv(1, 8, 2, 1, 700, D, seed=D, dtype=dtype)
    out, lse = ref.hydra(q, k, v, policy=SMALL, return_lse=True)
    assert out.dtype == dtype and out.shape == (1, 8, 1, D) and lse.dtype == torch.float32
    mask = ref.attended_token_mask(q, k, policy=SMALL)
    want, want_lse = dense64(q, k, v, mask.unsqueeze(2))
    close(out, want, atol=1e-2, rtol=1e-2)  # output rounding to the low-precision dtype only
    close(lse, want_lse, atol=1e-5, rtol=1e-5)  # lse is fp32 throughout


def test_out_is_written_and_returned():
    q, k, v = qkv(2, 8, 2, 1, 300, 32, seed=41)
    out = torch.full((2, 8, 1, 32), float("nan"))
    res, lse = ref.hydra(q, k, v, policy=SMALL, out=out, return_lse=True)
    assert res is out
    close(out, ref.hydra(q, k, v, policy=SMALL), atol=0, rtol=0)
    qp, kp, vp = qkv(1, 4, 2, 64, 64, 16, seed=42)
    out_p = torch.full((1, 4, 64, 16), float("nan"))
    assert ref.hydra(qp, kp, vp, out=out_p) is out_p and torch.isfinite(out_p).all()
    with pytest.raises(ValueError, match="out"):
        ref.hydra(q, k, v, out=torch.empty(2, 8, 1, 31))
    with pytest.raises(TypeError, match="out"):
        ref.hydra(q, k, v, out=torch.empty(2, 8, 1, 32, dtype=torch.float16))


# --------------------------------------------------------------------------- #
# Prefill                                                                     #
# --------------------------------------------------------------------------- #

def sdpa_causal(q, k, v):
    G = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(G, dim=1), v.float().repeat_interleave(G, dim=1), is_causal=True)


@pytest.mark.parametrize("Hq,Hkv", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("T,pol", [(64, None), (192, None), (256, None), (48, HydraPolicy(block_size=16)),
                                   (128, PREFILL)], ids=["64", "192", "256", "48_bs16", "128_at_budget"])
def test_prefill_under_budget_is_causal_sdpa(Hq, Hkv, T, pol):
    q, k, v = qkv(2, Hq, Hkv, T, T, 32, seed=T + Hq)
    out, lse = ref.hydra(q, k, v, policy=pol, return_lse=True)
    close(out, sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)
    i, j = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    close(lse, dense64(q, k, v, j <= i)[1])


@pytest.mark.parametrize("kwargs", [{"precision": "exact"}, {"policy_layer_idx": 1}], ids=["exact", "dense_layer"])
def test_prefill_exact_cases_over_budget(kwargs):
    q, k, v = qkv(1, 8, 2, 512, 512, 32, seed=51)
    out = ref.hydra(q, k, v, policy=PREFILL, **kwargs)
    close(out, sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)
    assert (ref.hydra(q, k, v, policy=PREFILL) - out).abs().max() > 1e-3


def block_scores64(q, k, bs):
    """(B, Hkv, nb_q, nb_k) float64: mean query per head of each query block vs key-block min/max."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G, nb = Hq // Hkv, T // bs
    qm = q.double().view(B, Hq, nb, bs, D).mean(dim=3)
    kb = k.double().view(B, Hkv, nb, bs, D)
    kmin, kmax = kb.amin(dim=3), kb.amax(dim=3)
    out = torch.zeros(B, Hkv, nb, nb, dtype=torch.float64)
    for h in range(Hkv):
        for g in range(G):
            a = qm[:, h * G + g].unsqueeze(2)  # (B, nb, 1, D)
            out[:, h] += torch.maximum(a * kmin[:, h].unsqueeze(1), a * kmax[:, h].unsqueeze(1)).sum(-1)
    return out


@pytest.mark.parametrize("pol", [PREFILL,
                                 HydraPolicy(page_size=16, sink_tokens=64, recent_tokens=48, budget_tokens=256,
                                             block_size=16),
                                 HydraPolicy(page_size=8, sink_tokens=0, recent_tokens=0, budget_tokens=64,
                                             block_size=16)],
                         ids=["small", "4sinks", "nosink"])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 4)], ids=["g4", "mha"])
def test_prefill_block_mask_rules(pol, Hq, Hkv):
    T, bs = 512, pol.block_size
    nb = T // bs
    q, k, v = qkv(2, Hq, Hkv, T, T, 32, seed=61 + Hq)
    m = ref.prefill_block_mask(q, k, policy=pol)
    assert m.shape == (2, Hkv, nb, nb) and m.dtype == torch.bool
    scores = block_scores64(q, k, bs).tolist()
    n_budget = pol.budget_tokens // bs
    sink = set(range(-(-pol.sink_tokens // bs)))
    back = pol.recent_tokens // bs
    for b in range(2):
        for h in range(Hkv):
            for i in range(nb):
                row = set(torch.nonzero(m[b, h, i]).flatten().tolist())
                assert max(row) == i, "causal: the diagonal, nothing after it"
                forced = {j for j in sink if j <= i} | set(range(max(0, i - back), i + 1))
                assert forced <= row
                assert len(row) == min(i + 1, max(n_budget, len(forced)))
                assert len(row) <= n_budget
                scored = row - forced
                unchosen = set(range(i)) - row
                if scored and unchosen:
                    lo = min(scores[b][h][i][j] for j in scored)
                    hi = max(scores[b][h][i][j] for j in unchosen)
                    assert lo >= hi - 1e-3 * abs(hi), f"row {i}: chosen {lo} below unchosen {hi}"
    # attention within the mask: token-causal inside the attended blocks
    out, lse = ref.hydra(q, k, v, policy=pol, return_lse=True)
    tok = m.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
    tok = tok & (torch.arange(T).view(-1, 1) >= torch.arange(T).view(1, -1))
    want, want_lse = dense64(q, k, v, tok)
    close(out, want)
    close(lse, want_lse)
    assert (out - sdpa_causal(q, k, v)).abs().max() > 1e-3  # really sparse


def test_prefill_needle_block_is_selected():
    T, bs, D = 512, 16, 32
    q, k, v = qkv(1, 8, 2, T, T, D, seed=71)
    needle_blocks = (9, 14)
    for h, nbk in enumerate(needle_blocks):
        qbar = q[0, h * 4:(h + 1) * 4].mean(dim=(0, 1))  # aligned with every block's mean query
        k[0, h, nbk * bs + 5] = 8.0 * qbar / qbar.norm() * math.sqrt(D)
    m = ref.prefill_block_mask(q, k, policy=PREFILL)
    for h, nbk in enumerate(needle_blocks):
        assert m[0, h, nbk:, nbk].all(), f"head {h}: needle block {nbk} missed by some later query block"


@pytest.mark.parametrize("T", [72, 100, 450])
def test_prefill_any_length(T):
    """T not a multiple of block_size: the last block is partial; under the budget it is
    exact causal attention, over it each query attends its block's selection."""
    q, k, v = qkv(1, 8, 2, T, T, 32, seed=T)
    close(ref.hydra(q, k, v), sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)
    pol = HydraPolicy(budget_tokens=128, sink_tokens=16, recent_tokens=32, block_size=32, dense_layers=0)
    m = ref.prefill_block_mask(q, k, policy=pol)
    nb = -(-T // 32)
    assert m.shape == (1, 2, nb, nb)
    assert (m.sum(-1) <= 4).all() and m[..., torch.arange(nb), torch.arange(nb)].all()
    out = ref.hydra(q, k, v, policy=pol)
    # a query of the partial last block attends what its block selected, token-causally
    t = T - 1
    keys = (torch.arange(T) <= t) & m[0, :, -1][:, torch.arange(T) // 32]  # (Hkv, T)
    want = dense64(q[:, :, t:t + 1], k, v, keys.view(1, 2, 1, T))[0]
    close(out[:, :, t:t + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Tq,Tkv", [(4, 100), (128, 640), (100, 600), (700, 700)])
def test_chunked_prefill_is_the_tail_of_full_prefill(Tq, Tkv):
    """Queries bottom-right aligned: exact mode gives the last Tq rows of the full causal
    prefill; with selection, a chunk whose start is block-aligned selects what the full
    prefill selects for those blocks, so it too gives the last Tq rows."""
    q, k, v = qkv(1, 8, 2, Tkv, Tkv, 32, seed=Tq + Tkv)
    tail = q[:, :, Tkv - Tq:]
    close(ref.hydra(tail, k, v), ref.hydra(q, k, v)[:, :, Tkv - Tq:], atol=1e-5, rtol=1e-5)
    pol = HydraPolicy(budget_tokens=256, sink_tokens=32, recent_tokens=64, block_size=32, dense_layers=0)
    if (Tkv - Tq) % 32 == 0:
        close(ref.hydra(tail, k, v, policy=pol), ref.hydra(q, k, v, policy=pol)[:, :, Tkv - Tq:],
              atol=1e-5, rtol=1e-5)
    m = ref.prefill_block_mask(tail, k, policy=pol)
    assert m.shape == (1, 2, -(-Tq // 32), -(-Tkv // 32))
    assert (m.sum(-1) <= 8).all()


# --------------------------------------------------------------------------- #
# Errors                                                                      #
# --------------------------------------------------------------------------- #

def test_errors():
    q, k, v = qkv(1, 8, 2, 1, 100, 32, seed=81)
    with pytest.raises(ValueError, match="Tq"):
        ref.hydra(*qkv(1, 8, 2, 8, 4, 32, seed=1))
    with pytest.raises(ValueError, match="is_causal"):
        ref.hydra(q, k, v, is_causal=False)
    with pytest.raises(ValueError, match="precision"):
        ref.hydra(q, k, v, precision="turbo")
    with pytest.raises(ValueError, match="Hq % Hkv"):
        ref.hydra(*qkv(1, 6, 4, 1, 100, 32, seed=1))
    with pytest.raises(TypeError, match="k must be torch.float32 like q, got torch.bfloat16"):
        ref.hydra(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="v must have k's shape"):
        ref.hydra(q, k, v[:, :, :50])
    with pytest.raises(ValueError, match="head dim"):
        ref.hydra(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="cache_seqlens"):
        ref.hydra(*qkv(1, 8, 2, 64, 64, 32, seed=1), cache_seqlens=torch.tensor([64], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens values"):
        ref.hydra(q, k, v, cache_seqlens=torch.tensor([101], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens values"):
        ref.hydra(q, k, v, cache_seqlens=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        ref.hydra(q, k, v, cache_seqlens=torch.tensor([5, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_seqlens"):
        ref.hydra(q, k, v, cache_seqlens=torch.tensor([5.0]))
    with pytest.raises(ValueError, match="sliding-window"):
        ref.select_pages(q, k, sliding_window=64)
    with pytest.raises(ValueError, match="sliding_window"):
        ref.hydra(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="page_summaries"):
        ref.hydra(q, k, v, policy=SMALL, page_summaries=torch.zeros(1, 2, 7, 2, 32))
    with pytest.raises(ValueError, match="Tq == 1"):
        ref.select_pages(*qkv(1, 8, 2, 64, 64, 32, seed=1)[:2])


# -- coarse-to-fine selection (superpages) -------------------------------------------

def test_superpage_summaries_are_coarser_page_summaries():
    """Folding pages' min/max equals summarising K by superpage-sized pages (exact)."""
    k = randn(2, 3, 1000, 32, seed=60, dtype=torch.bfloat16)
    lens = torch.tensor([1000, 437])
    fine = ref.page_summaries(k, page_size=8, cache_seqlens=lens)
    for S in (2, 16, 128):
        coarse = ref.superpage_summaries(fine, S)
        direct = ref.page_summaries(k, page_size=8 * S, cache_seqlens=lens)
        assert torch.equal(coarse, direct)
    with pytest.raises(ValueError, match="hydra: superpage must be a power of two >= 2, got 3"):
        ref.superpage_summaries(fine, 3)


def test_coarse_to_fine_selection_semantics():
    """Every chosen page lies in a shortlisted superpage; the chosen pages are the top
    scores among the shortlisted candidates; a shortlist covering everything is flat."""
    P, S = 8, 4
    pol = HydraPolicy(page_size=P, sink_tokens=16, recent_tokens=40, budget_tokens=128, superpage=S, shortlist=2)
    flat = HydraPolicy(page_size=P, sink_tokens=16, recent_tokens=40, budget_tokens=128)
    q, k, _ = qkv(2, 8, 2, 1, 2000, 32, seed=61)
    lens = torch.tensor([2000, 1337])
    pages = ref.select_pages(q, k, policy=pol, cache_seqlens=lens)
    summ = ref.page_summaries(k, page_size=P, cache_seqlens=lens)
    fine = ref.page_scores(q, summ, cache_seqlens=lens, page_size=P)
    coarse = ref.page_scores(q, ref.superpage_summaries(summ, S), cache_seqlens=lens, page_size=P * S)
    for b, L in enumerate(lens.tolist()):
        n_pages = -(-L // P)
        sink = set(range(pol.sink_pages))
        recent = set(range((L - pol.recent_tokens) // P, n_pages))
        cand = [p for p in range(n_pages) if p not in sink | recent]
        sp_cand = sorted({p // S for p in cand})
        for h in range(2):
            sp_rank = sorted(sp_cand, key=lambda x: (-coarse[b, h, x].item(), x))[: pol.n_short]
            allowed = [p for p in cand if p // S in sp_rank]
            k_top = pol.n_sel - len(sink | recent)
            want = sorted(sorted(allowed, key=lambda p: (-fine[b, h, p].item(), p))[:k_top])
            got = [p for p in pages[b, h].tolist() if p >= 0]
            assert got == sorted(sink | recent | set(want)), (b, h)
    wide = HydraPolicy(page_size=P, sink_tokens=16, recent_tokens=40, budget_tokens=128, superpage=S,
                       shortlist=1000)
    assert torch.equal(ref.select_pages(q, k, policy=wide, cache_seqlens=lens),
                       ref.select_pages(q, k, policy=flat, cache_seqlens=lens))


def test_coarse_policy_fields():
    assert HydraPolicy(page_size=8, budget_tokens=4096, superpage=16, shortlist=4).n_short == 128
    assert HydraPolicy().n_short == 0 and not HydraPolicy().coarse
    with pytest.raises(ValueError, match=r"hydra: HydraPolicy.superpage must be 0 \(flat\) or a power of two"):
        HydraPolicy(superpage=3)
    with pytest.raises(ValueError, match="hydra: HydraPolicy.shortlist must be >= 1, got 0"):
        HydraPolicy(superpage=4, shortlist=0)


# -- 8-bit (e4m3) page summaries ---------------------------------------------------------
def _e4m3_values():
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return torch.unique(v[torch.isfinite(v)])


def test_e4m3_outward_rounding_is_the_nearest_bound():
    """The stored min is the largest e4m3 value <= the true min, the max the smallest >= the
    true max (checked against the full e4m3 value list in float64), over subnormals,
    normals and saturation; -448 / 448 beyond the range."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-12, 11, (20000,), generator=g).float())
    x = torch.cat([x, torch.tensor([0.0, -0.0, 448.0, -448.0, 449.0, -449.0, 1e6, -1e6, 2.0 ** -9, -(2.0 ** -10)])])
    lo, hi = ref.e4m3_round_outward(x, x)
    vals = _e4m3_values()
    xd = x.double()
    below = torch.where(vals.view(1, -1) <= xd.view(-1, 1), vals.view(1, -1), torch.tensor(-448.0, dtype=torch.float64))
    above = torch.where(vals.view(1, -1) >= xd.view(-1, 1), vals.view(1, -1), torch.tensor(448.0, dtype=torch.float64))
    assert torch.equal(lo.double(), below.amax(1))
    assert torch.equal(hi.double(), above.amin(1))
    assert not bool((lo.view(torch.uint8) == 0x80).any()), "zero is stored as +0"


def test_e4m3_summaries_bound_the_keys_and_read_saturation_as_huge():
    """Decoded e4m3 summaries bracket the exact ones (scaled); a key beyond +-448 reads
    as -/+2^64 on its side, so the Quest bound still holds for any key."""
    k = randn(1, 2, 100, 16, seed=3) * 5
    k[0, 0, 20, 3] = 1000.0
    k[0, 1, 40, 7] = -2000.0
    for scale in (1.0, 0.125):
        s8 = ref.page_summaries(k, page_size=16, dtype=torch.float8_e4m3fn, scale=scale)
        exact = ref.page_summaries(k, page_size=16).double() * scale
        dec = ref.decode_summaries(s8).double()
        assert torch.all(dec[..., 0, :] <= exact[..., 0, :]) and torch.all(dec[..., 1, :] >= exact[..., 1, :])
        if scale == 1.0:
            assert dec[0, 0, 1, 1, 3] == 2.0 ** 64 and dec[0, 1, 2, 0, 7] == -(2.0 ** 64)
        q = randn(1, 4, 1, 16, seed=4)
        qd = q.double().view(1, 2, 2, 16)
        for p in range(7):  # the bound: score >= q . k for every key of the page, every head
            keys = k[0, :, p * 16:(p + 1) * 16].double() * scale  # (2, n, 16)
            s = ref.page_scores(q, s8, page_size=16)[0, :, p].double()
            true = torch.einsum("hgd,hnd->hgn", qd[0], keys).amax(-1).sum(-1)
            assert torch.all(s >= true - 1e-3 * true.abs().clamp_min(1)), (p, s, true)


def test_e4m3_superpages_commute_with_rounding():
    """Outward rounding is monotone, so superpages of e4m3 page summaries are the e4m3
    summaries of the superpages' tokens: a coarse level costs no extra rounding."""
    k = randn(2, 2, 1000, 32, seed=6) * 30
    lens = torch.tensor([1000, 333])
    s8 = ref.page_summaries(k, page_size=8, cache_seqlens=lens, dtype=torch.float8_e4m3fn, scale=0.5)
    sup = ref.superpage_summaries(s8, 8)
    want = ref.page_summaries(k, page_size=64, cache_seqlens=lens, dtype=torch.float8_e4m3fn, scale=0.5)
    assert torch.equal(sup.view(torch.uint8), want.view(torch.uint8))
