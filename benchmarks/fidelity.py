"""Fidelity of hydra's bounded attention against full attention (issue 4, first part).

    python3 benchmarks/fidelity.py --synthetic                    # CPU-sized defaults
    python3 benchmarks/fidelity.py --synthetic --device cuda --T 4096,16384,65536
    python3 benchmarks/fidelity.py --captured qkv.pt              # real attention, see below

For each scorer and page size at equal token budget, per layer and KV-head group:
- mass recall: the share of the dense softmax mass that falls in the attended set;
- top-10 recall: how many of the 10 highest-weight keys are attended;
- best-page rank: the rank, by the scorer, of the candidate page holding the
  highest-weight key (0 = ranked first; only when that key lies in a candidate page);
- rel err: ||o - o_hat|| / ||o|| of the attention output against dense attention;
- metadata bytes a decode step reads to score (summaries per page).

Scorers (all select the same number of pages on top of the same sink and recent pages):
- ``quest_sum`` (hydra's default, ``hydra.reference.page_scores``): Quest's bound
  sum_j sum_d max(q_jd kmin_d, q_jd kmax_d), summed over the GQA group;
- ``group_max``: the same bound, max over the group instead of the sum;
- ``centre_radius``: a ball bound, sum_j (q_j . c + ||q_j|| ||r||), c and r the box's
  centre and half-width;
- ``mean_spread``: sum_j (q_j . mu + sum_d |q_jd| sigma_d), the page's key mean and
  standard deviation (the same metadata size as min/max);
- ``streaming``: sink pages and the most recent pages up to the same budget
  (StreamingLLM), the floor.
- ``quest_sum_fp8``: ``quest_sum`` over summaries stored in fp8 (e4m3), each min rounded
  down and each max rounded up to an e4m3 value, so the bound still holds; half the
  metadata bytes of bf16 summaries at the same page size (the kernels' e4m3 summaries,
  through ``hydra.reference.page_summaries(k, dtype=torch.float8_e4m3fn)``);
- ``quest_sum_int8``: the same with 8-bit integers on a per-page scale (the page's
  largest |min| or |max| / 127, kept in fp16), min rounded down and max up;
- ``quest_sum_c2f``: ``quest_sum`` with coarse-to-fine selection
  (``HydraPolicy(superpage=16, shortlist=4)``): superpages of 16 pages are scored, the
  best ``4 x budget`` tokens' worth are shortlisted, and only their pages are ranked;
  the metadata read is the superpage summaries plus the shortlisted pages' summaries.
- ``mean_fp8``: the GQA group's summed query dotted with each page's mean key, the mean
  stored in e4m3 (D bytes a page: a quarter of a bf16 min/max pair). Not a bound: a
  page's best key can score above its mean. Mean keys per chunk serve as selection
  "landmarks" in ShadowKV (Sun et al., 2024, 8-token chunks).
- ``mean_fp8_quest``: two stages over the same pages: the ``MEAN_SHORTLIST x n_sel``
  candidate pages with the best ``mean_fp8`` scores are shortlisted, and ``quest_sum``
  picks the pages among them; the metadata read is every page's e4m3 mean plus the
  shortlisted pages' bf16 summaries. A coarse-to-fine selection whose coarse level keeps
  the fine pages' granularity and cuts their bytes instead.

Inputs: ``--synthetic`` draws random keys with planted needle keys (aligned with the
group's query) at random depths (independent keys by default; ``--smooth N`` makes
neighbouring keys correlated, ``--outlier-channels`` adds large biased channels,
``--cancel`` hides each needle from its block's mean: which scorer wins depends on
these, NOTES v38); ``--captured FILE`` loads a dict saved with
torch.save holding lists (one entry per layer) ``q`` (B, Hq, 1, D), ``k`` and ``v``
(B, Hkv, T, D) captured from a real model's decode step.

This is the harness only: the real-model capture, passkey retrieval and the
evidence file of issue 4 are still to do. It runs on hydra.reference, so it needs
no GPU (``--device cuda`` only moves the arithmetic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
from hydra import reference as ref  # noqa: E402
from hydra.policy import HydraPolicy  # noqa: E402

SCORERS = ("quest_sum", "group_max", "centre_radius", "mean_spread", "streaming", "quest_sum_c2f",
           "quest_sum_fp8", "quest_sum_int8", "mean_fp8", "mean_fp8_quest")
# Metadata bytes per page at head dim D, per scorer (the default: a bf16 min and max row).
META_BYTES = {"quest_sum_fp8": lambda D: 2 * D, "quest_sum_int8": lambda D: 2 * D + 2, "mean_fp8": lambda D: D}
C2F_SUPERPAGE, C2F_SHORTLIST = 16, 4
MEAN_SHORTLIST = 2  # mean_fp8_quest's shortlist, as a multiple of the page budget


# ----------------------------------------------------------------------------
# Page metadata and scores, all fp32: (B, Hkv, n_pages) per scorer
# ----------------------------------------------------------------------------
def _pages(k, P):
    """k (B, H, T, D) -> (B, H, n_pages, P, D) zero-padded, and a validity mask (n_pages, P)."""
    B, H, T, D = k.shape
    n = math.ceil(T / P)
    pad = n * P - T
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, H, n, P, D)
    valid = (torch.arange(n * P, device=k.device) < T).view(n, P)
    return kp, valid


def int8_outward(kmin, kmax):
    """kmin / kmax on a per-page scale (largest magnitude / 127, stored in fp16), rounded
    outward to 8-bit integers (fp32 out)."""
    big = torch.maximum(kmin.abs().amax(-1, keepdim=True), kmax.abs().amax(-1, keepdim=True))
    scale = (big / 127).to(torch.float16).float()
    scale = torch.where(scale * 127 < big, scale * (1 + 2 ** -10), scale).clamp_min(2 ** -24)  # cover big
    return (torch.floor(kmin / scale).clamp(-127, 127) * scale,
            torch.ceil(kmax / scale).clamp(-127, 127) * scale)


def page_means_fp8(k, P):
    """(B, H, n_pages, D) e4m3 mean key of each page's valid tokens (rounded to nearest,
    saturated at +-448), returned as fp32."""
    kp, valid = _pages(k, P)
    cnt = valid.sum(1).clamp_min(1).view(1, 1, -1, 1).float()
    mean = (kp * valid.view(1, 1, *valid.shape, 1)).sum(3) / cnt
    return mean.clamp(-448, 448).to(torch.float8_e4m3fn).float()


def page_scores(scorer, q, k, P):
    """Scores of every page for each KV head's group; q (B, Hq, 1, D), k (B, Hkv, T, D)."""
    B, Hq, _, D = q.shape
    H = k.shape[1]
    G = Hq // H
    qg = q.float().view(B, H, G, D)
    if scorer == "quest_sum":
        return ref.page_scores(q, ref.page_summaries(k, page_size=P), page_size=P)
    if scorer == "quest_sum_fp8":  # the shipped e4m3 summaries (HydraPolicy(summary_dtype="fp8_e4m3"))
        return ref.page_scores(q, ref.page_summaries(k, page_size=P, dtype=torch.float8_e4m3fn), page_size=P)
    if scorer == "mean_fp8":  # the summed query: sum_j q_j . mean = (sum_j q_j) . mean
        return torch.einsum("bhd,bhnd->bhn", qg.sum(2), page_means_fp8(k, P))
    if scorer == "quest_sum_int8":
        summ = ref.page_summaries(k, page_size=P).float()          # (B, H, n, 2, D), exact
        kmin, kmax = int8_outward(summ[..., 0, :], summ[..., 1, :])
        return torch.maximum(qg[:, :, :, None] * kmin[:, :, None], qg[:, :, :, None] * kmax[:, :, None]).sum(-1).sum(2)
    kp, valid = _pages(k, P)
    big = torch.finfo(torch.float32).max
    vmask = valid.view(1, 1, *valid.shape, 1)
    kmin = torch.where(vmask, kp, big).amin(3)   # (B, H, n, D)
    kmax = torch.where(vmask, kp, -big).amax(3)
    if scorer == "group_max":
        per_head = torch.maximum(qg[:, :, :, None] * kmin[:, :, None], qg[:, :, :, None] * kmax[:, :, None]).sum(-1)
        return per_head.amax(2)
    if scorer == "centre_radius":
        c, r = (kmin + kmax) / 2, (kmax - kmin) / 2
        return (torch.einsum("bhgd,bhnd->bhn", qg, c)
                + qg.norm(dim=-1).sum(2, keepdim=True) * r.norm(dim=-1))
    if scorer == "mean_spread":
        cnt = valid.sum(1).clamp_min(1).view(1, 1, -1, 1).float()
        mu = (kp * vmask).sum(3) / cnt
        var = (((kp - mu[:, :, :, None]) ** 2) * vmask).sum(3) / cnt
        return torch.einsum("bhgd,bhnd->bhn", qg, mu) + torch.einsum("bhgd,bhnd->bhn", qg.abs(), var.sqrt())
    if scorer == "streaming":
        return torch.full(kmin.shape[:3], -math.inf, device=k.device)
    raise ValueError(f"unknown scorer {scorer!r}; one of {SCORERS}")


def select_from_scores(scores, T, policy):
    """(B, H, n_pages) bool: sink + recent pages and the top-k candidates by score
    (ties to the lower page), the rule of SPEC section 2 with any score."""
    P = policy.page_size
    n = math.ceil(T / P)
    sel = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if T <= policy.budget_tokens:
        sel[:] = True
        return sel
    sink = min(policy.sink_pages, n)
    first_recent = max(T - policy.recent_tokens, 0) // P
    sel[..., :sink] = True
    sel[..., first_recent:] = True
    k = policy.n_sel - int(sel[0, 0].sum())
    lo, hi = sink, max(first_recent, sink)
    if k > 0 and hi > lo:
        cand = scores[..., lo:hi]
        if torch.isinf(cand).all():  # the streaming floor: the budget goes to the most recent pages
            sel[..., max(hi - k, lo):hi] = True
            return sel
        # stable descending sort: equal scores keep their page order
        order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :k]
        sel[..., lo:hi].scatter_(-1, order, True)
    return sel


def mean_shortlist(coarse, T, policy, n_short):
    """(B, H, n_pages) bool: the ``n_short`` candidate pages (outside the sink and recent
    pages) with the best coarse scores, ties to the lower page; every candidate when there
    are no more than that."""
    P = policy.page_size
    n = coarse.shape[-1]
    sink = min(policy.sink_pages, n)
    first_recent = max(max(T - policy.recent_tokens, 0) // P, sink)
    short = torch.zeros(coarse.shape, dtype=torch.bool, device=coarse.device)
    cand = coarse[..., sink:first_recent]
    order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :n_short]
    short[..., sink:first_recent].scatter_(-1, order, True)
    return short


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------
def fidelity_metrics(q, k, v, scorer, policy, scale=None):
    """Per (b, KV head) metrics, averaged over the group's query heads; returns a dict of
    (B, Hkv) tensors and the metadata bytes per decode step."""
    B, Hq, _, D = q.shape
    H, T = k.shape[1], k.shape[2]
    G, P = Hq // H, policy.page_size
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qg = q.float().view(B, H, G, D)
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale
    p = logits.softmax(-1)                                           # dense weights (B, H, G, T)
    o = torch.einsum("bhgt,bhtd->bhgd", p, v.float())
    if scorer == "quest_sum_c2f":  # hydra's coarse-to-fine selection, through the reference
        scores = page_scores("quest_sum", q, k, P)
        c2f = dataclasses.replace(policy, superpage=C2F_SUPERPAGE, shortlist=C2F_SHORTLIST)
        listed = ref.select_pages(q, k, policy=c2f)
        n = scores.shape[-1]
        pages = torch.zeros((B, H, n + 1), dtype=torch.bool, device=q.device)
        pages.scatter_(-1, torch.where(listed >= 0, listed.long(), n), True)
        pages = pages[..., :n]
        meta_pages = math.ceil(n / C2F_SUPERPAGE) + min(c2f.n_short * C2F_SUPERPAGE, n)
    elif scorer == "mean_fp8_quest":
        scores = page_scores("quest_sum", q, k, P)
        short = mean_shortlist(page_scores("mean_fp8", q, k, P), T, policy, MEAN_SHORTLIST * policy.n_sel)
        pages = select_from_scores(torch.where(short, scores, -math.inf), T, policy)
        n = scores.shape[-1]
        meta_pages = None
        meta_bytes = B * H * (n * META_BYTES["mean_fp8"](D) + int(short.sum(-1).amax()) * 4 * D) \
            if T > policy.budget_tokens else B * H * n * 4 * D
    else:
        scores = page_scores(scorer, q, k, P)
        pages = select_from_scores(scores, T, policy)                # (B, H, n)
        meta_pages = scores.shape[-1]
    mask = pages.repeat_interleave(P, dim=-1)[..., :T]               # (B, H, T)
    m = mask[:, :, None, :]
    mass = (p * m).sum(-1)
    top10 = p.topk(min(10, T), dim=-1).indices
    top10_recall = torch.gather(m.expand_as(p), -1, top10).float().mean(-1)
    p_hat = torch.where(m, logits, -math.inf).softmax(-1)
    o_hat = torch.einsum("bhgt,bhtd->bhgd", p_hat, v.float())
    rel_err = (o - o_hat).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-30)
    # rank of the best key's page among candidate pages, by the scorer
    n = scores.shape[-1]
    sink = min(policy.sink_pages, n)
    first_recent = max(T - policy.recent_tokens, 0) // P
    best_page = p.sum(2).argmax(-1) // P                              # group's heaviest key
    rank = torch.full((B, H), -1, dtype=torch.long, device=q.device)
    for b in range(B):
        for h in range(H):
            bp = int(best_page[b, h])
            if sink <= bp < first_recent and scorer != "streaming":
                cand = scores[b, h, sink:first_recent]
                rank[b, h] = int((cand > cand[bp - sink]).sum())
    if meta_pages is not None:
        meta_bytes = B * H * meta_pages * META_BYTES.get(scorer, lambda d: 2 * d * 2)(D)
    return {"mass_recall": mass.mean(2), "top10_recall": top10_recall.mean(2), "rel_err": rel_err.mean(2),
            "best_page_rank": rank, "metadata_bytes": meta_bytes}


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------
def synthetic_layer(B, Hq, H, T, D, seed, device, n_needles=4, strength=3.0, outlier_channels=0,
                    outlier_scale=15.0, cancel=False, smooth=0, smooth_noise=0.3):
    """Random q/k/v with n_needles keys per KV head aligned with the group's mean query,
    at random depths outside the sink and recent windows. With outlier_channels > 0, that
    many key channels are scaled by outlier_scale and offset by it (the large, biased key
    dimensions of real LLMs), and the queries use them 5x less; the needles are planted
    after, along the group's mean query. With cancel=True the other 7 keys of each needle's
    8-token block (page-aligned at 8, 16 and 32 tokens) are moved by -1/7 of the needle, so
    the block's mean carries none of it: the case a page's mean key cannot see and its
    min/max bound still can. With smooth > 1 the keys are locally correlated, as adjacent
    keys of real models are: each is the mean of `smooth` neighbouring random keys plus
    `smooth_noise` of fresh noise (unit variance after each step), before the outliers and
    needles; a needle then stands out of its page's keys rather than among random ones."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    if smooth > 1:
        x = k.transpose(2, 3).reshape(B * H, D, T)
        x = torch.nn.functional.avg_pool1d(x, smooth, 1, smooth // 2, count_include_pad=False)[..., :T]
        k = x.reshape(B, H, D, T).transpose(2, 3)
        k = k / k.std() + smooth_noise * torch.randn(B, H, T, D, generator=g)
        k = k / k.std()
    if outlier_channels > 0:
        ch = torch.randperm(D, generator=g)[:outlier_channels]
        k[..., ch] = k[..., ch] * outlier_scale + outlier_scale
        q[..., ch] = q[..., ch] * 0.2
    qbar = q.view(B, H, Hq // H, D).mean(2)
    lo, hi = min(128, T // 4), max(T - 1024, T // 2)
    for b in range(B):
        for h in range(H):
            for t in torch.randint(lo, hi, (n_needles,), generator=g).tolist():
                needle = strength * qbar[b, h] / qbar[b, h].norm() * math.sqrt(D)
                k[b, h, t] = needle
                if cancel:
                    block = [u for u in range(t // 8 * 8, t // 8 * 8 + 8) if u != t]
                    k[b, h, block] -= needle / len(block)
    to = dict(device=device, dtype=torch.bfloat16)
    return q.to(**to), k.to(**to), v.to(**to)


def policies(budgets, page_sizes):
    for budget in budgets:
        for P in page_sizes:
            yield budget, P, HydraPolicy(page_size=P, budget_tokens=budget, sink_tokens=64,
                                         recent_tokens=min(512, budget // 4))


DEFAULT_PAGE = HydraPolicy().page_size  # the shipped presets' page size


def row_name(source, scorer, P):
    """Evidence row name: ``<source>_default`` for the shipped rule (quest_sum at the
    presets' page size), else ``<source>_<scorer>_p<P>``."""
    if scorer == "quest_sum" and P == DEFAULT_PAGE:
        return f"{source}_default"
    return f"{source}_{scorer}_p{P}"


def run(layers, budgets, page_sizes, scorers, source):
    rows = []
    for li, (q, k, v) in enumerate(layers):
        T = k.shape[2]
        for budget, P, pol in policies(budgets, page_sizes):
            if budget >= T:
                continue
            for scorer in scorers:
                if scorer == "streaming" and P != page_sizes[0]:
                    continue
                m = fidelity_metrics(q, k, v, scorer, pol)
                ranks = m["best_page_rank"][m["best_page_rank"] >= 0]
                rows.append({"name": row_name(source, scorer, P), "scorer": scorer, "page_size": P,
                             "budget": budget, "T": T, "layer": li,
                             "mass_recall": float(m["mass_recall"].mean()),
                             "top10_recall": float(m["top10_recall"].mean()),
                             "rel_err": float(m["rel_err"].mean()),
                             "best_page_rank_median": float(ranks.float().median()) if ranks.numel() else None,
                             "metadata_bytes": m["metadata_bytes"]})
    return rows


def table(rows):
    out = ["| source/scorer | P | budget | T | layer | mass recall | top-10 recall | rel err | best-page rank | metadata MB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rank = "-" if r["best_page_rank_median"] is None else f"{r['best_page_rank_median']:.0f}"
        out.append(f"| {r['name']} | {r['page_size']} | {r['budget']} | {r['T']:,} | {r['layer']} | "
                   f"{r['mass_recall']:.3f} | {r['top10_recall']:.2f} | {r['rel_err']:.3f} | {rank} | "
                   f"{r['metadata_bytes'] / 1e6:.2f} |")
    return "\n".join(out)


def main(argv=None):
    global C2F_SUPERPAGE, C2F_SHORTLIST
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true")
    src.add_argument("--captured", help="torch.save'd dict of per-layer lists q, k, v")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--T", default="4096,8192", help="synthetic context lengths")
    ap.add_argument("--needles", type=int, default=16, help="synthetic: planted keys per KV head")
    ap.add_argument("--strength", type=float, default=1.0,
                    help="synthetic: needle length in units of sqrt(D) (1.0: comparable to the largest "
                         "random coordinates, so page bounds must work to find them)")
    ap.add_argument("--outlier-channels", type=int, default=0,
                    help="synthetic: key channels made large and biased, as in real LLM keys")
    ap.add_argument("--outlier-scale", type=float, default=15.0, help="synthetic: their scale and offset")
    ap.add_argument("--smooth", type=int, default=0,
                    help="synthetic: each key the mean of this many neighbouring random keys (locally "
                         "correlated keys, as in real models), plus --smooth-noise")
    ap.add_argument("--smooth-noise", type=float, default=0.3, help="synthetic: fresh noise added to smoothed keys")
    ap.add_argument("--cancel", action="store_true",
                    help="synthetic: each needle's 8-token block cancels it in the block's mean key")
    ap.add_argument("--c2f-superpage", type=int, default=C2F_SUPERPAGE,
                    help="quest_sum_c2f: pages per superpage (a power of two)")
    ap.add_argument("--c2f-shortlist", type=int, default=C2F_SHORTLIST,
                    help="quest_sum_c2f: shortlist as a multiple of the page budget")
    ap.add_argument("--budgets", default="512,1024,2048,4096")
    ap.add_argument("--page-sizes", default="8,16,32")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--json", help="write the rows here as plain JSON")
    ap.add_argument("--evidence", help="write a stamped evidence file here (SPEC section 6), "
                                       "e.g. evidence/fidelity.json")
    args = ap.parse_args(argv)
    C2F_SUPERPAGE, C2F_SHORTLIST = args.c2f_superpage, args.c2f_shortlist
    budgets = [int(x) for x in args.budgets.split(",")]
    page_sizes = [int(x) for x in args.page_sizes.split(",")]
    scorers = args.scorers.split(",")
    captured_note = None
    if args.synthetic:
        layers = [synthetic_layer(1, 32, 8, T, 128, seed=T, device=args.device, n_needles=args.needles,
                                  strength=args.strength, outlier_channels=args.outlier_channels,
                                  outlier_scale=args.outlier_scale, cancel=args.cancel, smooth=args.smooth,
                                  smooth_noise=args.smooth_noise)
                  for T in (int(x) for x in args.T.split(","))]
        source = "synthetic"
    else:
        d = torch.load(args.captured, map_location=args.device)
        layers = list(zip(d["q"], d["k"], d["v"]))
        captured_note = d.get("note")
        source = "real"
    rows = run(layers, budgets, page_sizes, scorers, source)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "fidelity", "rows": rows}, indent=1))
    if args.evidence:
        from hydra.evidence import write_evidence

        extra = {"source": source, "device_used": args.device, "budgets": budgets, "page_sizes": page_sizes,
                 "scorers": scorers, "superpage": C2F_SUPERPAGE, "shortlist": C2F_SHORTLIST,
                 "inputs": (f"synthetic: torch.randn q/k/v (B=1, Hq=32, Hkv=8, D=128, bf16) with {args.needles} "
                            f"planted needle keys per KV head aligned with the group's mean query (length "
                            f"{args.strength} x sqrt(D)), at random depths"
                            + (f"; {args.outlier_channels} key channels scaled and offset by {args.outlier_scale}"
                               if args.outlier_channels else "")
                            + ("; the other 7 keys of each needle's 8-token block moved by -1/7 of it (--cancel)"
                               if args.cancel else "")
                            + (f"; keys locally correlated: each the mean of {args.smooth} neighbouring random keys "
                               f"plus {args.smooth_noise} fresh noise (--smooth)" if args.smooth > 1 else "")
                            if args.synthetic else f"captured: {args.captured}"
                            + (f" ({captured_note})" if captured_note else "")),
                 "missing": "real-model capture and passkey retrieval (issue 4): no small causal LM with "
                            "weights in a registry package was found for this machine"}
        write_evidence(args.evidence, kind="fidelity", command="python3 " + " ".join(sys.argv), rows=rows,
                       extra=extra)
        print(f"wrote {args.evidence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
