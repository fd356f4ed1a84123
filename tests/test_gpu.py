"""GPU parity of hydra's CUDA kernels against hydra.reference (fp32).

Every test draws fresh random inputs, poisons outputs with NaN before the kernel
runs, and compares with the fp32 reference. The output tolerance comes from data:
the kernel's relative error must be at most twice PyTorch's own bf16 SDPA error
on the same attended set (plus 1e-4 for outputs that round to near zero).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

hydra = pytest.importorskip("hydra")
ref = hydra.reference

DEV = "cuda"
BF16 = torch.bfloat16


def _need_ops():
    if hydra.ops is None:
        pytest.fail("the CUDA extension did not build on a GPU machine")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_qkv(B, Hq, Hkv, T, D=128, *, seed, slack=0, q_transposed=False, dtype=BF16):
    """Random bf16 (or fp16) q, k, v; with slack > 0, k and v are views K[:, :, :T] of a longer cache."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    if q_transposed:  # (B, 1, Hq, D) storage, viewed as (B, Hq, 1, D): non-contiguous heads
        q = torch.randn(B, 1, Hq, D, device=DEV, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, 1, D, device=DEV, generator=g).to(dtype)
    K = torch.randn(B, Hkv, T + slack, D, device=DEV, generator=g).to(dtype)
    V = torch.randn(B, Hkv, T + slack, D, device=DEV, generator=g).to(dtype)
    return q, K[:, :, :T], V[:, :, :T]


def poison_past(k, v, lens):
    """Fill positions >= L with NaN: a kernel that reads them produces NaN."""
    for b, L in enumerate(lens.tolist()):
        k[b, :, L:] = float("nan")
        v[b, :, L:] = float("nan")


def nan_like(q):
    return torch.full_like(q, float("nan"))


def mask_from_pages(pages, T, P, lens=None):
    """(B, Hkv, T) bool: tokens < L of the listed pages."""
    B, Hkv, _ = pages.shape
    tok = torch.arange(T, device=pages.device)
    page_of = tok // P
    m = torch.zeros(B, Hkv, T, dtype=torch.bool, device=pages.device)
    for b in range(B):
        for h in range(Hkv):
            sel = pages[b, h]
            sel = sel[sel >= 0]
            m[b, h] = torch.isin(page_of, sel)
    if lens is not None:
        m &= tok.view(1, 1, T) < lens.view(B, 1, 1)
    return m


def sdpa_bf16_err(q, k, v, mask, scale):
    """PyTorch's own bf16 error on the attended set, against the fp32 reference."""
    G = q.shape[1] // k.shape[1]
    m = mask.repeat_interleave(G, dim=1).unsqueeze(2)  # (B, Hq, 1, T)
    o_bf16 = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), attn_mask=m, scale=scale)
    o_ref = ref.attention_with_mask(q, k, v, mask.unsqueeze(2), scale=scale)
    return rel_err(o_bf16, o_ref), o_ref


def check_output(o, q, k, v, mask, scale=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    assert not torch.isnan(o).any(), "kernel left NaN (unwritten or read poisoned memory)"
    err_torch, o_ref = sdpa_bf16_err(q, k.nan_to_num(0.0), v.nan_to_num(0.0), mask, scale)
    err = rel_err(o, o_ref)
    assert err <= 2 * err_torch + 1e-4, f"kernel rel err {err:.3e} > 2 x torch bf16 {err_torch:.3e}"
    return err


def check_selection(pages_k, q, k, pol, lens=None, summaries=None):
    """Kernel pages == reference pages, except swaps within relative 1e-3 of the k-th score."""
    pages_r = ref.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=summaries)
    assert pages_k.shape == pages_r.shape and pages_k.dtype == torch.int32
    summ = summaries if summaries is not None else ref.page_summaries(k, page_size=pol.page_size,
                                                                      cache_seqlens=lens)
    scores = ref.page_scores(q, summ, cache_seqlens=lens, page_size=pol.page_size)
    B, Hkv, n_sel = pages_k.shape
    for b in range(B):
        for h in range(Hkv):
            kp, rp = pages_k[b, h].tolist(), pages_r[b, h].tolist()
            kv = [p for p in kp if p >= 0]
            assert kv == sorted(kv) and len(set(kv)) == len(kv), f"not ascending/unique: {kp}"
            assert all(p < 0 for p in kp[len(kv):]), f"-1 padding must trail: {kp}"
            ks, rs = set(kv), {p for p in rp if p >= 0}
            assert len(ks) == len(rs), f"(b={b}, h={h}) kernel chose {len(ks)} pages, reference {len(rs)}"
            diff = ks ^ rs
            if diff:
                sc = scores[b, h]
                chosen = sorted((sc[p].item() for p in rs), reverse=True)
                thr = chosen[-1] if chosen else 0.0
                for p in diff:
                    assert abs(sc[p].item() - thr) <= 1e-3 * max(abs(thr), 1e-6), \
                        f"(b={b}, h={h}) page {p} score {sc[p].item()} is not a near-tie of {thr}"


# ---------------------------------------------------------------------------------

SMALL = hydra.HydraPolicy(budget_tokens=64, sink_tokens=16, recent_tokens=16)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("T", [1, 15, 17, 97, 4097])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (16, 2), (6, 2), (16, 1)])
def test_decode_parity_small_policy(T, Hq, Hkv):
    _need_ops()
    q, k, v = make_qkv(2, Hq, Hkv, T, seed=T * 31 + Hq, slack=5 * 8)
    out = nan_like(q)
    o, lse = hydra.hydra(q, k, v, policy=SMALL, out=out, return_lse=True)
    assert o is out
    pages = hydra.select_pages(q, k, policy=SMALL)
    check_selection(pages, q, k, SMALL)
    mask = mask_from_pages(pages, T, SMALL.page_size)
    check_output(o, q, k, v, mask)
    _, lse_ref = ref.sparse_attention(q, k, v, pages, page_size=SMALL.page_size, return_lse=True)
    assert torch.allclose(lse, lse_ref.float(), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("T", [4097, 65537])
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (32, 8), (16, 2)])
def test_decode_parity_high(T, Hq, Hkv):
    _need_ops()
    q, k, v = make_qkv(1, Hq, Hkv, T, seed=T + Hq)
    pol = hydra.HydraPolicy()  # the "high" preset
    summ = hydra.page_summaries(k)
    for s in (summ, None):
        o = hydra.hydra(q, k, v, page_summaries=s, out=nan_like(q))
        pages = hydra.select_pages(q, k, page_summaries=s)
        check_selection(pages, q, k, pol, summaries=s)
        check_output(o, q, k, v, mask_from_pages(pages, T, 16))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("P", [8, 16, 32, 64])
def test_ragged_seqlens_and_page_sizes(P):
    _need_ops()
    B, T = 4, 1000
    pol = hydra.HydraPolicy(page_size=P, budget_tokens=8 * P, sink_tokens=P, recent_tokens=2 * P)
    q, k, v = make_qkv(B, 8, 2, T, seed=P, slack=64, q_transposed=True)
    lens = torch.tensor([1, 255, 256 + P // 2, T], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, page_size=P, cache_seqlens=lens)
    assert torch.equal(summ, ref.page_summaries(k, page_size=P, cache_seqlens=lens))
    for s in (summ, None):
        o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=s, out=nan_like(q))
        pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=s)
        check_selection(pages, q, k, pol, lens=lens, summaries=s)
        check_output(o, q, k, v, mask_from_pages(pages, T, P, lens))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("P", [8, 16])
def test_left_padding(P):
    """cache_leftpad: positions before the padding end and past L hold NaN and are never
    read; selection, summaries and output equal the reference, which equals attending
    over each sequence with its padding cut off."""
    _need_ops()
    B, T = 5, 1500
    pol = hydra.HydraPolicy(page_size=P, budget_tokens=16 * P, sink_tokens=P + 3, recent_tokens=3 * P)
    q, k, v = make_qkv(B, 12, 3, T, seed=40 + P, slack=8)
    lens = torch.tensor([T, 1400, 1000, 37, 1499], dtype=torch.int32, device=DEV)
    pad = torch.tensor([0, 5, 999, 20, 1000 + P // 2], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    for b, n in enumerate(pad.tolist()):
        k[b, :, :n] = float("nan")
        v[b, :, :n] = float("nan")
    summ = hydra.page_summaries(k, page_size=P, cache_seqlens=lens, cache_leftpad=pad)
    assert torch.equal(summ, ref.page_summaries(k, page_size=P, cache_seqlens=lens, cache_leftpad=pad))
    for s in (summ, None):
        o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, cache_leftpad=pad, page_summaries=s,
                        out=nan_like(q))
        pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, cache_leftpad=pad, page_summaries=s)
        pages_r = ref.select_pages(q, k, policy=pol, cache_seqlens=lens, cache_leftpad=pad)
        assert torch.equal(pages, pages_r)
        mask = ref.attended_token_mask(q, k, policy=pol, cache_seqlens=lens, cache_leftpad=pad)
        check_output(o, q, k, v, mask)
        # the same as cutting each sequence's padding off
        for b in range(B):
            lo, hi = int(pad[b]), int(lens[b])
            o_b = ref.hydra(q[b:b + 1], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], policy=pol)
            assert rel_err(o[b:b + 1], o_b) < 1e-2
    # exact precision and sliding windows count from the first valid token too
    for kw in ({"precision": "exact"}, {"sliding_window": 200}):
        o = hydra.hydra(q, k, v, cache_seqlens=lens, cache_leftpad=pad, out=nan_like(q), **kw)
        mask = ref.attended_token_mask(q, k, cache_seqlens=lens, cache_leftpad=pad, **kw)
        check_output(o, q, k, v, mask)


@pytest.mark.parametrize("T", [1, 17, 4097, 65537])
def test_page_summaries_bitwise(T):
    _need_ops()
    _, k, _ = make_qkv(2, 8, 4, T, seed=T, slack=3 * 8)
    lens = torch.tensor([max(1, T // 3), T], dtype=torch.int32, device=DEV)
    for P in (8, 16, 64):
        got = hydra.page_summaries(k, page_size=P, cache_seqlens=lens)
        want = ref.page_summaries(k, page_size=P, cache_seqlens=lens)
        assert torch.equal(got, want), f"P={P}: summaries differ"


@pytest.mark.kernels_ci
def test_exact_modes_equal_dense():
    _need_ops()
    B, T = 2, 5000  # the first sequence is longer than the 4096-token budget
    q, k, v = make_qkv(B, 16, 4, T, seed=7)
    lens = torch.tensor([T, 1234], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    dense = (torch.arange(T, device=DEV).view(1, 1, T) < lens.view(B, 1, 1)).expand(B, 4, T)
    for kwargs in (dict(precision="exact"), dict(policy_layer_idx=0), dict(policy_layer_idx=1)):
        o = hydra.hydra(q, k, v, cache_seqlens=lens, out=nan_like(q), **kwargs)
        check_output(o, q, k, v, dense)
        pages = hydra.select_pages(q, k, cache_seqlens=lens, **kwargs)
        assert torch.equal(mask_from_pages(pages, T, 16, lens), dense)
    # Past dense_layers the layer is sparse again: the first sequence selects, the second is exact.
    o = hydra.hydra(q, k, v, cache_seqlens=lens, policy_layer_idx=2, out=nan_like(q))
    pages = hydra.select_pages(q, k, cache_seqlens=lens, policy_layer_idx=2)
    assert (pages[0] >= 0).sum(-1).eq(256).all() and torch.equal(mask_from_pages(pages, T, 16, lens)[1], dense[1])
    check_output(o, q, k, v, mask_from_pages(pages, T, 16, lens))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("W", [1, 100, 512, 5000])
def test_sliding_window(W):
    _need_ops()
    B, T = 2, 2049
    q, k, v = make_qkv(B, 8, 2, T, seed=W)
    lens = torch.tensor([T, 700], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    o = hydra.hydra(q, k, v, sliding_window=W, cache_seqlens=lens, out=nan_like(q))
    tok = torch.arange(T, device=DEV).view(1, 1, T)
    mask = ((tok < lens.view(B, 1, 1)) & (tok >= (lens.view(B, 1, 1) - W))).expand(B, 2, T)
    check_output(o, q, k, v, mask)


@pytest.mark.kernels_ci
def test_sparse_attention_padding_and_duplicates():
    _need_ops()
    T, P = 1000, 16
    q, k, v = make_qkv(1, 8, 2, T, seed=3)
    pages = torch.tensor([[[0, 3, 3, 7, 62, -1, -1], [5, 5, 5, 6, 10, 11, -1]]], dtype=torch.int32, device=DEV)
    o, lse = hydra.sparse_attention(q, k, v, pages, page_size=P, return_lse=True, out=nan_like(q))
    mask = mask_from_pages(pages, T, P)
    check_output(o, q, k, v, mask)
    _, lse_ref = ref.sparse_attention(q, k, v, pages, page_size=P, return_lse=True)
    assert torch.allclose(lse, lse_ref.float(), atol=2e-3)


def test_selection_million_pages():
    """2^20 pages per sequence (16M tokens) through cached summaries; k is a zero-stride view."""
    _need_ops()
    P, n_pages = 16, 1 << 20
    T = n_pages * P
    g = torch.Generator(device=DEV).manual_seed(11)
    q = torch.randn(1, 4, 1, 128, device=DEV, generator=g).to(BF16)
    k = torch.randn(1, 1, 1, 128, device=DEV, generator=g).to(BF16).expand(1, 1, T, 128)
    base = torch.randn(1, 1, n_pages, 1, 128, device=DEV, generator=g)
    spread = torch.rand(1, 1, n_pages, 1, 128, device=DEV, generator=g)
    summ = torch.cat([base - spread, base + spread], dim=3).to(BF16)
    pol = hydra.HydraPolicy()
    pages = hydra.select_pages(q, k, page_summaries=summ)
    scores = ref.page_scores(q, summ)[0, 0]
    sel = pages[0, 0]
    assert (sel >= 0).all() and (sel[1:] > sel[:-1]).all()
    forced = set(range(pol.sink_pages)) | set(range((T - pol.recent_tokens) // P, n_pages))
    chosen = set(sel.tolist())
    assert forced <= chosen
    scored = torch.tensor(sorted(chosen - forced), device=DEV)
    cand = torch.ones(n_pages, dtype=torch.bool, device=DEV)
    cand[list(forced)] = False
    cand[scored] = False
    worst_chosen = scores[scored].min().item()
    best_left = scores[cand].max().item()
    assert worst_chosen >= best_left - 1e-3 * abs(best_left)


@pytest.mark.kernels_ci
def test_cuda_graph_replay_matches_eager():
    _need_ops()
    B, T = 2, 9000
    q, k, v = make_qkv(B, 32, 8, T, seed=5)
    lens = torch.tensor([T, 5000], dtype=torch.int32, device=DEV)
    summ = hydra.page_summaries(k, cache_seqlens=lens)
    out = torch.empty_like(q)
    step = lambda: hydra.hydra(q, k, v, cache_seqlens=lens, page_summaries=summ, out=out)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        q2, k2, v2 = make_qkv(B, 32, 8, T, seed=100 + seed)
        q.copy_(q2); k.copy_(k2); v.copy_(v2)
        lens.copy_(torch.tensor([T - 37 * seed, 4000 + 999 * seed], dtype=torch.int32))
        summ.copy_(hydra.page_summaries(k, cache_seqlens=lens))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = hydra.hydra(q, k, v, cache_seqlens=lens, page_summaries=summ)
        assert torch.equal(out, eager), f"replay {seed} differs from eager"


@pytest.mark.kernels_ci
def test_torch_compile_fullgraph():
    _need_ops()
    q, k, v = make_qkv(1, 8, 2, 5000, seed=9)

    def f(q, k, v):
        return hydra.hydra(q, k, v) * 2

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))


@pytest.mark.kernels_ci
def test_opcheck_every_op():
    _need_ops()
    from hydra import add_op_namespace_prefix, ops

    q, k, v = make_qkv(1, 8, 2, 700, seed=13)
    lens = torch.tensor([650], dtype=torch.int32, device=DEV)
    summ = hydra.page_summaries(k, cache_seqlens=lens)
    torch.library.opcheck(ops.page_summaries.default, (k, lens, None, 16, 1.0, summ))
    pages = torch.empty(1, 2, 16, dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.select_pages.default, (q, k, summ, None, lens, None, 16, 0, 0, 64, 64, 256, pages))
    out = torch.empty_like(q)
    lse = torch.empty(1, 8, 1, dtype=torch.float32, device=DEV)
    torch.library.opcheck(ops.decode.default, (q, k, v, None, summ, None, lens, None, 16, 0, 0, 64, 64, 256, 0, 0.088, out, lse))
    torch.library.opcheck(ops.decode.default, (q, k, v, pages, None, None, lens, None, 16, 0, 0, 0, 0, 0, 0, 0.088, out, lse))
    torch.library.opcheck(ops.decode_alloc.default, (q, k, v, None, summ, None, lens, None, 16, 0, 0, 64, 64, 256, 0, 0.088))
    o2, lse2 = ops.decode_alloc(q, k, v, None, summ, None, lens, None, 16, 0, 0, 64, 64, 256, 0, 0.088)
    ops.decode(q, k, v, None, summ, None, lens, None, 16, 0, 0, 64, 64, 256, 0, 0.088, out, lse)
    assert torch.equal(o2, out) and torch.equal(lse2, lse)
    # coarse-to-fine: superpages of 4 pages, a shortlist of 3
    sup = hydra.superpage_summaries(summ, 4)
    torch.library.opcheck(ops.select_pages.default, (q, k, summ, sup, lens, None, 16, 4, 3, 64, 64, 256, pages))
    torch.library.opcheck(ops.decode.default, (q, k, v, None, summ, sup, lens, None, 16, 4, 3, 64, 64, 256, 0, 0.088, out, lse))
    pad = torch.tensor([37], dtype=torch.int32, device=DEV)  # left padding
    summ_p = hydra.page_summaries(k, cache_seqlens=lens, cache_leftpad=pad)
    torch.library.opcheck(ops.page_summaries.default, (k, lens, pad, 16, 1.0, summ_p))
    torch.library.opcheck(ops.decode.default, (q, k, v, None, summ_p, None, lens, pad, 16, 0, 0, 64, 64, 256, 0, 0.088, out, lse))
    assert add_op_namespace_prefix("decode").endswith("::decode")


@pytest.mark.parametrize("n_pages", [9000, 8191, 4097, 4096, 3001])
@pytest.mark.parametrize("dist", ["outliers", "normal", "ties"])
def test_selection_score_distributions(dist, n_pages):
    """Top-k selection on skewed score distributions: a few far outliers, a normal
    spread, and a handful of distinct values (ties at the threshold). Scores are set
    directly through crafted summaries (kmin = kmax = alpha * q / |q|^2). Rows of more
    than 8,192 scores (9,000) keep their keys in shared memory; rows up to 4,096 (4,096:
    every thread's 8 register keys in use; 3,001) run the 512-thread register select,
    4,097-8,192 (4,097; 8,191: every thread's 8 in use) the 1,024-thread one."""
    _need_ops()
    P = 16
    T = n_pages * P
    g = torch.Generator(device=DEV).manual_seed(21)
    q = torch.randn(1, 1, 1, 128, device=DEV, generator=g).to(BF16)
    k = torch.randn(1, 1, 1, 128, device=DEV, generator=g).to(BF16).expand(1, 1, T, 128)
    if dist == "outliers":  # 2% of pages far above the rest; k is ~3%
        alpha = torch.rand(n_pages, device=DEV, generator=g)
        alpha[torch.randperm(n_pages, device=DEV, generator=g)[: n_pages // 50]] += 100.0
    elif dist == "normal":
        alpha = torch.randn(n_pages, device=DEV, generator=g) * 3.0 + 10.0
    else:  # a handful of distinct values: ties at the threshold
        alpha = torch.randint(0, 4, (n_pages,), device=DEV, generator=g).float()
    qf = q.float().reshape(128)
    x = alpha.view(n_pages, 1) * (qf / qf.dot(qf)).view(1, 128)
    summ = torch.stack([x, x], dim=1).view(1, 1, n_pages, 2, 128).to(BF16)
    pol = hydra.HydraPolicy()
    pages = hydra.select_pages(q, k, page_summaries=summ)
    check_selection(pages, q, k, pol, summaries=summ)
    if dist == "ties":  # equal scores: the lowest page indices win, exactly as the reference
        assert torch.equal(pages, ref.select_pages(q, k, policy=pol, page_summaries=summ))


@pytest.mark.parametrize("B,Hq,Hkv,D,dtype,fp8,T", [(3, 8, 2, 128, BF16, False, 300007),
                                                    (2, 9, 3, 64, BF16, False, 300007),
                                                    (2, 16, 2, 256, BF16, False, 300007),
                                                    (1, 16, 2, 256, BF16, False, 300007),
                                                    (2, 8, 2, 128, torch.float16, False, 300007),
                                                    (3, 8, 2, 128, BF16, True, 300007),
                                                    (2, 16, 2, 256, torch.float16, True, 300007),
                                                    (2, 8, 2, 128, BF16, True, 600011)])
def test_cluster_selection(B, Hq, Hkv, D, dtype, fp8, T, kernel_probe):
    """On sm_90+, flat selection from cached summaries over long rows (>= 16,384 pages)
    runs on a cluster (score_select_cluster_kernel): scoring and selection in one launch
    for 16-bit summaries, unless the rows are too few for the cluster's SMs to read them
    fast (B = 1, Hkv = 2, D = 256); otherwise (e4m3 summaries always) the selection alone
    after a score kernel, with clusters of 16 CTAs from 32,768 pages on where they fit
    (T = 600,011). Ragged lengths: a full row (several
    radix passes), a shorter one, and one under the budget (every page attended). Its
    pages follow the reference's rules, and the step's output matches the reference."""
    _need_ops()
    q, k, v = make_qkv(B, Hq, Hkv, T, D=D, seed=T + D + B, dtype=dtype)
    lens = torch.tensor([T, 4000, T // 3 + 1][:B], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, cache_seqlens=lens, dtype=torch.float8_e4m3fn if fp8 else None)
    pol = hydra.HydraPolicy()
    with kernel_probe() as names:
        pages = hydra.select_pages(q, k, page_summaries=summ, cache_seqlens=lens)
    if names is not None and torch.cuda.get_device_capability()[0] >= 9:
        assert any("score_select_cluster_kernel" in n for n in names), sorted(names)
        if fp8 and (T + 15) // 16 >= 32768 and torch.cuda.get_device_capability()[0] == 9 \
                and not os.environ.get("HYDRA_CS_CTAS"):  # H100/H200, the size the plan picks
            assert any("score_select_cluster_kernel" in n and ", 16>" in n for n in names), sorted(names)
    check_selection(pages, q, k.nan_to_num(0.0) if fp8 else k, pol, lens=lens, summaries=summ)
    o = hydra.hydra(q, k, v, page_summaries=summ, cache_seqlens=lens, out=nan_like(q))
    check_output(o, q, k, v, mask_from_pages(pages, T, pol.page_size, lens))


_CLUSTER_SIZE_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import hydra
from test_gpu import make_qkv, poison_past, check_selection, check_output, mask_from_pages, nan_like
C = os.environ["HYDRA_CS_CTAS"]
pol = hydra.HydraPolicy()
for B, Hq, Hkv, D, dtype, fp8, T in ((2, 8, 2, 128, torch.bfloat16, False, 300007),
                                     (1, 16, 2, 256, torch.float16, False, 262147),
                                     (2, 9, 3, 64, torch.bfloat16, True, 600011)):
    q, k, v = make_qkv(B, Hq, Hkv, T, D=D, seed=T + D + int(C), dtype=dtype)
    lens = torch.tensor([T, T // 2 + 7][:B], dtype=torch.int32, device="cuda")
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, cache_seqlens=lens, dtype=torch.float8_e4m3fn if fp8 else None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        pages = hydra.select_pages(q, k, page_summaries=summ, cache_seqlens=lens)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "score_select_cluster_kernel" in e.name]
    assert names and all(n.endswith(f", {C}>(hydra::ScoreParams, hydra::SelectParams, int)") for n in names), names
    check_selection(pages, q, k.nan_to_num(0.0) if fp8 else k, pol, lens=lens, summaries=summ)
    o = hydra.hydra(q, k, v, page_summaries=summ, cache_seqlens=lens, out=nan_like(q))
    check_output(o, q, k, v, mask_from_pages(pages, T, pol.page_size, lens))
print("ok")
"""


@pytest.mark.parametrize("ctas", [10, 12, 16])
def test_cluster_sizes(ctas):
    """The cluster selection at each cluster size the plan may pick (8 runs in
    test_cluster_selection; 10, 12 and 16 where enough of them fit at once), forced through
    HYDRA_CS_CTAS in a fresh process: 16-bit summaries (scoring and selection in the
    cluster) and e4m3 ones (selection alone), D = 64 / 128 / 256, ragged lengths."""
    _need_ops()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90+")
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    hydra_dir = os.path.dirname(os.path.dirname(os.path.abspath(hydra.__file__)))  # the package's parent
    env = dict(os.environ, HYDRA_CS_CTAS=str(ctas),
               PYTHONPATH=os.pathsep.join([hydra_dir, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _CLUSTER_SIZE_SCRIPT, here], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


# (B, Hq, Hkv, D, dtype, T, lens, fused, summaries): rows up to the fused short step's
# 1,024 pages and past it, ragged lengths (one under the budget), GQA groups of 4, 3, 5
# and 7, every head dim, fp16; 16-bit and e4m3 summaries ("e4m3_sat": scale 2^7, so that
# codes saturate and the e4m3 scorer rescores those rows in fp32). fused: whether the
# fused step must run on sm_90+ (None: either way).
SHORT_STEP = [
    (1, 32, 8, 128, BF16, 8192 + 5, None, True, None),
    (1, 32, 8, 128, BF16, 16384, None, True, None),
    (1, 32, 8, 128, BF16, 16384 + 1, None, False, None),
    (2, 9, 3, 64, BF16, 16001, [16001, 3001], None, None),
    (1, 16, 2, 256, torch.float16, 16384, None, True, None),
    (3, 15, 3, 128, BF16, 9000, [9000, 4100, 200], None, None),
    (1, 14, 2, 128, BF16, 6007, None, True, None),
    (1, 32, 8, 128, BF16, 8192 + 5, None, True, "e4m3"),
    (1, 32, 8, 128, BF16, 16384 + 1, None, False, "e4m3"),
    (2, 9, 3, 64, BF16, 16001, [16001, 3001], None, "e4m3"),
    (1, 16, 2, 256, torch.float16, 16384, None, True, "e4m3"),
    (3, 15, 3, 128, BF16, 9000, [9000, 4100, 200], None, "e4m3_sat"),
]


def step_matches_separate_kernels(q, k, v, summ, lens, want_fused, probe):
    """The decode step (profiled) and the separate kernels on the same inputs: on sm_90+
    the fused short step ran iff want_fused (None: either way), and the step's output and
    LSE are bitwise those of select_pages + sparse_attention (probe: the kernel_probe
    fixture). Returns (output, pages)."""
    with probe() as names:
        o, lse = hydra.hydra(q, k, v, page_summaries=summ, cache_seqlens=lens, out=nan_like(q), return_lse=True)
    if names is not None and torch.cuda.get_device_capability()[0] >= 9 and want_fused is not None:
        fused = any("short_step_kernel" in n for n in names)
        assert fused == want_fused, f"fused short step ran: {fused}, expected {want_fused}"
    pages = hydra.select_pages(q, k, page_summaries=summ, cache_seqlens=lens)
    o2, lse2 = hydra.sparse_attention(q, k, v, pages, cache_seqlens=lens, out=nan_like(q), return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2), "fused step differs from the separate kernels"
    return o, pages


@pytest.mark.parametrize("case", range(len(SHORT_STEP)))
def test_short_step_matches_separate_kernels(case, kernel_probe):
    """The fused short-row step (score, select and attend in one cluster launch) gives
    bitwise the output and LSE of the separate kernels (select_pages + sparse_attention,
    which use the same split plan), and the reference's pages and attention."""
    _need_ops()
    B, Hq, Hkv, D, dtype, T, lens, want_fused, fmt = SHORT_STEP[case]
    q, k, v = make_qkv(B, Hq, Hkv, T, D=D, seed=T + case, dtype=dtype)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEV) if lens is not None else None
    if lens is not None:
        poison_past(k, v, lens)
    pol = hydra.HydraPolicy()
    if fmt is None:
        summ = hydra.page_summaries(k, cache_seqlens=lens)
    else:
        summ = hydra.page_summaries(k, cache_seqlens=lens, dtype=torch.float8_e4m3fn,
                                    scale=128.0 if fmt == "e4m3_sat" else 1.0)
        if fmt == "e4m3_sat":
            full = int(lens[0]) // 16 if lens is not None else T // 16  # pages of real keys (empty ones hold 448 too)
            codes = summ[0, :, :full].view(torch.uint8) & 0x7F
            assert bool((codes == 0x7E).any()), "no saturated code: the rare-row path is not exercised"
    o, pages = step_matches_separate_kernels(q, k, v, summ, lens, want_fused, kernel_probe)
    check_selection(pages, q, k, pol, lens=lens, summaries=summ)
    check_output(o, q, k, v, mask_from_pages(pages, T, 16, lens))


@pytest.mark.parametrize("group", [2, 40, 1024])
def test_short_step_ties(group, kernel_probe):
    """Tied page scores through the fused step's selection. Each page's keys are copied
    from the first page of its group of `group` pages, so whole groups score the same and
    the threshold falls inside a tie: groups of 2 leave a short list to rank, groups of 40
    more tied keys than that list holds (the search runs to the last bit), and 1,024 ties
    every candidate. The fused step must take the pages select_pages takes (the
    lowest-indexed of the tied ones); V differs between tied pages, so any other choice
    changes the output, which must be bitwise that of the separate kernels."""
    _need_ops()
    T, P = 8192 + 5, 16
    q, k, v = make_qkv(1, 32, 8, T, seed=100 + group)
    n_full = T // P
    kp = k[:, :, : n_full * P].view(1, 8, n_full, P, 128)
    src = (torch.arange(n_full, device=DEV) // group) * group
    kp.copy_(kp[:, :, src].clone())
    summ = hydra.page_summaries(k)
    o, pages = step_matches_separate_kernels(q, k, v, summ, None, True, kernel_probe)
    scores = ref.page_scores(q, summ, page_size=P)
    pol = hydra.HydraPolicy()
    n_head = pol.sink_tokens // P
    cand_hi = (T - pol.recent_tokens) // P  # the first recent page
    ties = 0
    for h in range(8):
        chosen = [x for x in pages[0, h].tolist() if n_head <= x < cand_hi]
        thr = min(scores[0, h, x].item() for x in chosen)
        ties += sum(scores[0, h, x].item() == thr and x not in chosen for x in range(n_head, cand_hi))
    assert ties > 0, "no tie was split by the threshold: the case tests nothing"
    check_selection(pages, q, k, pol, summaries=summ)
    check_output(o, q, k, v, mask_from_pages(pages, T, P, None))


_SWITCH_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import hydra
from test_gpu import make_qkv, poison_past, nan_like
# (B, Hq, Hkv, T, lens): a short row (the fused step, sm_90+), long ragged rows (the
# cluster selection, sm_90+) and a batch whose attention splits are long enough for the
# copies through L1; cached 16-bit summaries.
for B, Hq, Hkv, T, lens in ((1, 32, 8, 8192 + 5, None), (2, 8, 2, 300007, [300007, 123457]),
                            (9, 16, 8, 20003, [20003, 20003, 17001, 9000, 20003, 5003, 20003, 12345, 19999])):
    q, k, v = make_qkv(B, Hq, Hkv, T, seed=T)
    lens = torch.tensor(lens, dtype=torch.int32, device="cuda") if lens is not None else None
    if lens is not None:
        poison_past(k, v, lens)
    summ = hydra.page_summaries(k, cache_seqlens=lens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o, lse = hydra.hydra(q, k, v, page_summaries=summ, cache_seqlens=lens, out=nan_like(q), return_lse=True)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if "kernel" in e.name})
    torch.save({"o": o.cpu(), "lse": lse.cpu(), "names": names}, os.path.join(sys.argv[2], f"{T}.pt"))
print("ok")
"""


def test_environment_switches(tmp_path):
    """HYDRA_SHORT_STEP=0, HYDRA_CLUSTER_SELECT=0, HYDRA_PDL=0, HYDRA_L1_COPY=0 and
    HYDRA_L2_PREFETCH=0 (each read once a process) turn off the fused short step, the
    cluster selection, programmatic dependent launch, the attention's copies through L1
    and its L2 prefetch of the sink and recent rows, and the step's output and LSE stay
    bitwise the same: the separate kernels use the same split plan and select the same
    pages. (The third case's splits hold 22 tiles, past the 8 from which the launcher
    sends the copies through L1: the kernel's last template argument.)"""
    _need_ops()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused step, clusters and PDL need sm_90+")
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    hydra_dir = os.path.dirname(os.path.dirname(os.path.abspath(hydra.__file__)))  # the package's parent
    runs = {}
    for name, switches in (("default", {}), ("off", {"HYDRA_SHORT_STEP": "0", "HYDRA_CLUSTER_SELECT": "0",
                                                        "HYDRA_PDL": "0", "HYDRA_L1_COPY": "0",
                                                        "HYDRA_L2_PREFETCH": "0"})):
        d = tmp_path / name
        d.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("HYDRA_SHORT_STEP", "HYDRA_CLUSTER_SELECT", "HYDRA_PDL", "HYDRA_L1_COPY",
                            "HYDRA_L2_PREFETCH")}
        env.update(switches, PYTHONPATH=os.pathsep.join([hydra_dir, os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run([sys.executable, "-c", _SWITCH_SCRIPT, here, str(d)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
        runs[name] = {T: torch.load(d / f"{T}.pt") for T in (8192 + 5, 300007, 20003)}
    on, off = runs["default"], runs["off"]
    assert any("short_step_kernel" in n for n in on[8192 + 5]["names"]), on[8192 + 5]["names"]
    assert any("score_select_cluster_kernel" in n for n in on[300007]["names"]), on[300007]["names"]
    l1 = [n for n in on[20003]["names"] if "sparse_decode_kernel<" in n]
    assert l1 and all(", true>(" in n for n in l1), on[20003]["names"]
    assert not any("sparse_decode_kernel<" in n and ", true>(" in n for T in off for n in off[T]["names"]), \
        off[20003]["names"]
    for T in (8192 + 5, 300007, 20003):
        assert not any("short_step_kernel" in n or "score_select_cluster_kernel" in n for n in off[T]["names"]), \
            off[T]["names"]
        assert any("sparse_decode_kernel" in n for n in off[T]["names"]), off[T]["names"]
        assert torch.equal(on[T]["o"], off[T]["o"]) and torch.equal(on[T]["lse"], off[T]["lse"]), \
            f"T={T}: the switches changed the output"
        assert not torch.isnan(on[T]["o"]).any(), f"T={T}: NaN in the output"


_SMALL_SMEM_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import hydra
from test_gpu import make_qkv, check_selection, check_output, mask_from_pages, nan_like
names = set()
pol = hydra.HydraPolicy(page_size=8, budget_tokens=1024, sink_tokens=64, recent_tokens=256)
for T in (4097, 8 * 12000 + 5):  # the second has more pages than a ~80 KB block can cache
    q, k, v = make_qkv(1, 8, 2, T, seed=T)
    summ = hydra.page_summaries(k, page_size=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o = hydra.hydra(q, k, v, policy=pol, page_summaries=summ, out=nan_like(q))
        torch.cuda.synchronize()
    names |= {e.name for e in prof.events()}
    pages = hydra.select_pages(q, k, policy=pol, page_summaries=summ)
    check_selection(pages, q, k, pol, summaries=summ)
    check_output(o, q, k, v, mask_from_pages(pages, T, 8))
assert any("sparse_decode_kernel<128, 2," in n for n in names), sorted(names)
q, k, v = make_qkv(1, 16, 2, 3000, D=256, seed=5)  # D = 256 fits only one stage in ~80 KB
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    o = hydra.hydra(q, k, v, policy=pol, out=nan_like(q))
    torch.cuda.synchronize()
assert any("sparse_decode_kernel<256, 1," in e.name for e in prof.events())
pages = hydra.select_pages(q, k, policy=pol)
check_output(o, q, k, v, mask_from_pages(pages, 3000, 8))
print("ok")
"""


def test_small_shared_memory_configuration():
    """GPUs with ~100 KB of shared memory per block (RTX 30/40/50) get a 2-stage
    attention pipeline and a smaller selection key cache; HYDRA_MAX_SMEM_PER_BLOCK
    forces that configuration here, in a fresh process."""
    _need_ops()
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    hydra_dir = os.path.dirname(os.path.dirname(os.path.abspath(hydra.__file__)))  # the package's parent
    env = dict(os.environ, HYDRA_MAX_SMEM_PER_BLOCK="80000",
               PYTHONPATH=os.pathsep.join([hydra_dir, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _SMALL_SMEM_SCRIPT, here], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("P", [8, 16])
def test_no_recent_window(P):
    """recent_tokens=0: every page but the sinks is scored, the partial last page included
    (the stateless path must not read past L when it builds that page's bound)."""
    _need_ops()
    B, T = 3, 700
    pol = hydra.HydraPolicy(page_size=P, budget_tokens=8 * P, sink_tokens=P, recent_tokens=0)
    q, k, v = make_qkv(B, 8, 2, T, seed=40 + P, slack=32)
    lens = torch.tensor([T, 300 + P // 2 + 1, 5 * P], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, page_size=P, cache_seqlens=lens)
    for s in (summ, None):
        o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=s, out=nan_like(q))
        pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=s)
        check_selection(pages, q, k.nan_to_num(0.0), pol, lens=lens, summaries=summ)
        check_output(o, q, k, v, mask_from_pages(pages, T, P, lens))



COARSE = [
    hydra.HydraPolicy(page_size=8, budget_tokens=512, sink_tokens=64, recent_tokens=128, superpage=16, shortlist=2),
    hydra.HydraPolicy(page_size=16, budget_tokens=1024, sink_tokens=16, recent_tokens=0, superpage=4, shortlist=1),
    hydra.HydraPolicy(page_size=8, budget_tokens=256, sink_tokens=8, recent_tokens=40, superpage=2, shortlist=3),
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("pi", range(len(COARSE)))
def test_coarse_to_fine_matches_reference(pi):
    """Coarse-to-fine selection (superpage scores, shortlist, fine scores of the shortlisted
    superpages, top-k) against the reference, with ragged lengths and the output parity."""
    _need_ops()
    pol = COARSE[pi]
    B, T = 3, 9001
    q, k, v = make_qkv(B, 12, 3, T, seed=90 + pi, slack=16)
    lens = torch.tensor([T, 5003, 300], dtype=torch.int32, device=DEV)  # the last is within the budget
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, page_size=pol.page_size, cache_seqlens=lens)
    sup = hydra.superpage_summaries(summ, pol.superpage)
    assert torch.equal(sup, ref.superpage_summaries(summ, pol.superpage))
    for supers in (sup, None):  # cached, or built from the page summaries
        pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=summ,
                                   superpage_summaries=supers)
        want = ref.select_pages(q, k.nan_to_num(0.0), policy=pol, cache_seqlens=lens, page_summaries=summ,
                                superpage_summaries=sup)
        assert torch.equal(pages, want), "coarse-to-fine selection differs from the reference"
        o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=summ, superpage_summaries=supers,
                        out=nan_like(q))
        check_output(o, q, k, v, mask_from_pages(pages, T, pol.page_size, lens))
    # the stateless call builds both levels itself and selects the same pages
    assert torch.equal(hydra.select_pages(q, k, policy=pol, cache_seqlens=lens), pages)
    # with a shortlist covering every superpage, coarse-to-fine is flat selection
    wide = hydra.HydraPolicy(**{**pol.__dict__, "shortlist": 10**4})
    flat = hydra.HydraPolicy(**{**pol.__dict__, "superpage": 0})
    assert torch.equal(hydra.select_pages(q, k, policy=wide, cache_seqlens=lens, page_summaries=summ),
                       hydra.select_pages(q, k, policy=flat, cache_seqlens=lens, page_summaries=summ))


@pytest.mark.parametrize("T,S,shortlist", [(131072, 4, 10), (150001, 4, 6), (150001, 8, 3)])
def test_coarse_to_fine_long_rows(T, S, shortlist):
    """Coarse-to-fine rows long enough for both register selects and their boundaries:
    superpage rows of 4,096 (the 512-thread select, full) and 4,688 and 2,344 (the
    1,024- and 512-thread ones), and shortlists of 5,120, 3,072 and 1,536 fine pages
    (budget 512 pages of 8 tokens). Pages equal the reference's."""
    _need_ops()
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=4096, sink_tokens=64, recent_tokens=256, superpage=S,
                            shortlist=shortlist)
    B = 2
    q, k, v = make_qkv(B, 4, 2, T, seed=7 + S + shortlist)
    lens = torch.tensor([T, T - 20011], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, page_size=pol.page_size, cache_seqlens=lens)
    sup = hydra.superpage_summaries(summ, pol.superpage)
    pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=summ, superpage_summaries=sup)
    want = ref.select_pages(q, k.nan_to_num(0.0), policy=pol, cache_seqlens=lens, page_summaries=summ,
                            superpage_summaries=sup)
    assert torch.equal(pages, want), "coarse-to-fine selection differs from the reference"


@pytest.mark.parametrize("B,Hq,Hkv,D,dtype,T,fp8", [(1, 32, 8, 128, BF16, 131075, False),
                                                    (2, 9, 3, 64, BF16, 40009, False),
                                                    (1, 16, 2, 256, torch.float16, 70001, False),
                                                    (3, 6, 2, 128, torch.float16, 20011, False),
                                                    (2, 9, 3, 64, BF16, 40009, True),
                                                    (2, 16, 2, 256, torch.float16, 30011, True)])
def test_coarse_to_fine_head_dims(B, Hq, Hkv, D, dtype, T, fp8):
    """Coarse-to-fine steps at head dims 64 / 128 / 256, bf16 and fp16, 16-bit and e4m3
    summaries, with ragged lengths (the last row of three under the budget), left padding
    and NaN past the lengths. Pages equal the reference's, and the step's output matches
    the fp32 reference over the tokens the reference attends (check_output's bound)."""
    _need_ops()
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=2048, sink_tokens=64, recent_tokens=256, superpage=16,
                            shortlist=3)
    q, k, v = make_qkv(B, Hq, Hkv, T, D=D, seed=T + D + B + fp8, dtype=dtype)
    lens = torch.tensor([T, T // 2 + 7, 1500][:B], dtype=torch.int32, device=DEV)
    pad = torch.tensor([0, 333, 5][:B], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, page_size=8, cache_seqlens=lens, cache_leftpad=pad,
                                dtype=torch.float8_e4m3fn if fp8 else None)
    sup = hydra.superpage_summaries(summ, pol.superpage)
    pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=summ, superpage_summaries=sup,
                               cache_leftpad=pad)
    want = ref.select_pages(q, k.nan_to_num(0.0), policy=pol, cache_seqlens=lens, page_summaries=summ,
                            superpage_summaries=sup, cache_leftpad=pad)
    assert torch.equal(pages, want), "coarse-to-fine selection differs from the reference"
    o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=summ, superpage_summaries=sup,
                    cache_leftpad=pad, out=nan_like(q))
    mask = ref.attended_token_mask(q, k.nan_to_num(0.0), policy=pol, cache_seqlens=lens, page_summaries=summ,
                                   superpage_summaries=sup, cache_leftpad=pad)
    check_output(o, q, k, v, mask)


# -- head dims 64 and 256 (issue 9, bf16) ----------------------------------------------
HEAD_DIM_SHAPES = [(64, 9, 3), (256, 16, 2), (64, 4, 4), (256, 6, 1)]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("D,Hq,Hkv", HEAD_DIM_SHAPES)
@pytest.mark.parametrize("T", [97, 4097, 20000])
def test_head_dims(D, Hq, Hkv, T):
    """Summaries, selection (cached and stateless) and attention at D = 64 and 256, with
    ragged lengths and NaN past them, against the fp32 reference."""
    _need_ops()
    pol = hydra.HydraPolicy(page_size=16, budget_tokens=1024, sink_tokens=64, recent_tokens=256)
    B = 2
    q, k, v = make_qkv(B, Hq, Hkv, T, D=D, seed=T + D + Hq, slack=24)
    lens = torch.tensor([T, max(1, T // 2 + 3)], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, cache_seqlens=lens)
    assert torch.equal(summ, ref.page_summaries(k, page_size=16, cache_seqlens=lens))
    for s in (summ, None):
        o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=s, out=nan_like(q))
        pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=s)
        check_selection(pages, q, k.nan_to_num(0.0), pol, lens=lens, summaries=summ)
        check_output(o, q, k, v, mask_from_pages(pages, T, 16, lens))
    exact = hydra.hydra(q, k, v, precision="exact", cache_seqlens=lens, out=nan_like(q))
    check_output(exact, q, k, v, (torch.arange(T, device=DEV).view(1, 1, T) < lens.view(B, 1, 1)).expand(B, Hkv, T))


@pytest.mark.parametrize("D", [64, 256])
def test_head_dim_cache_step(D):
    """HydraKVCache at D = 64 / 256: fused steps equal append + attend, summaries exact."""
    _need_ops()
    from test_cache import assert_same_contents, assert_summaries_exact

    Hq, H = (9, 3) if D == 64 else (16, 2)
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=128, sink_tokens=8, recent_tokens=24)
    fused, plain = (hydra.HydraKVCache(2, H, D, 600, device=DEV, policy=pol) for _ in range(2))
    g = torch.Generator(device=DEV).manual_seed(D)
    k = torch.randn(2, H, 500, D, device=DEV, generator=g).to(BF16)
    v = torch.randn(2, H, 500, D, device=DEV, generator=g).to(BF16)
    lens = torch.tensor([500, 333], dtype=torch.int32, device=DEV)
    fused.prefill(k, v, seqlens=lens)
    plain.prefill(k, v, seqlens=lens)
    for i in range(20):
        q = torch.randn(2, Hq, 1, D, device=DEV, generator=g).to(BF16)
        kn = torch.randn(2, H, 1, D, device=DEV, generator=g).to(BF16)
        vn = torch.randn(2, H, 1, D, device=DEV, generator=g).to(BF16)
        got = fused.step(q, kn, vn, out=nan_like(q))
        plain.append(kn, vn)
        assert torch.equal(got, plain.attend(q)), f"step {i}"
    assert_same_contents(fused, plain)
    assert_summaries_exact(fused)



# -- fp16 (issue 9): every path, every head dim, groups that are not powers of two -------
FP16 = torch.float16


@pytest.mark.kernels_ci
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (15, 3), (10, 2), (14, 2), (16, 1)])
def test_fp16_parity(D, Hq, Hkv):
    """fp16 q/k/v: page summaries (bitwise), selection and attention (cached summaries,
    stateless, exact), ragged lengths with NaN past them, against the fp32 reference."""
    _need_ops()
    T = 5003
    pol = hydra.HydraPolicy(page_size=16, budget_tokens=1024, sink_tokens=64, recent_tokens=256)
    q, k, v = make_qkv(2, Hq, Hkv, T, D=D, seed=D * 7 + Hq, slack=40, dtype=FP16)
    lens = torch.tensor([T, 3001], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    summ = hydra.page_summaries(k, cache_seqlens=lens)
    assert summ.dtype == FP16 and torch.equal(summ, ref.page_summaries(k, page_size=16, cache_seqlens=lens))
    for s in (summ, None):
        o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=s, out=nan_like(q))
        assert o.dtype == FP16
        pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=s)
        check_selection(pages, q, k.nan_to_num(0.0), pol, lens=lens, summaries=summ)
        check_output(o, q, k, v, mask_from_pages(pages, T, 16, lens))
    o, lse = hydra.hydra(q, k, v, precision="exact", cache_seqlens=lens, return_lse=True)
    valid = (torch.arange(T, device=DEV).view(1, 1, T) < lens.view(2, 1, 1)).expand(2, Hkv, T)
    check_output(o, q, k, v, valid)
    _, lse_ref = ref.hydra(q, k.nan_to_num(0.0), v.nan_to_num(0.0), precision="exact", cache_seqlens=lens,
                           return_lse=True)
    assert torch.allclose(lse, lse_ref.float(), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("superpage", [0, 4])
def test_fp16_cache(superpage):
    """HydraKVCache in fp16: prefill, fused steps (flat and coarse-to-fine) equal
    append + attend, summaries exact, graph replay."""
    _need_ops()
    from test_cache import assert_same_contents, assert_summaries_exact

    B, Hq, H, D = 2, 12, 3, 128
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=128, sink_tokens=8, recent_tokens=24, superpage=superpage,
                            shortlist=2)
    fused, plain = (hydra.HydraKVCache(B, H, D, 700, dtype=FP16, device=DEV, policy=pol) for _ in range(2))
    g = torch.Generator(device=DEV).manual_seed(77 + superpage)
    k = torch.randn(B, H, 600, D, device=DEV, generator=g).to(FP16)
    v = torch.randn(B, H, 600, D, device=DEV, generator=g).to(FP16)
    lens = torch.tensor([600, 431], dtype=torch.int32, device=DEV)
    fused.prefill(k, v, seqlens=lens)
    plain.prefill(k, v, seqlens=lens)
    q = torch.randn(B, Hq, 1, D, device=DEV, generator=g).to(FP16)
    kn = torch.randn(B, H, 1, D, device=DEV, generator=g).to(FP16)
    vn = torch.randn(B, H, 1, D, device=DEV, generator=g).to(FP16)
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step(q, kn, vn, out=out)
    for i in range(20):
        q.copy_(torch.randn(B, Hq, 1, D, device=DEV, generator=g).to(FP16))
        kn.copy_(torch.randn(B, H, 1, D, device=DEV, generator=g).to(FP16))
        vn.copy_(torch.randn(B, H, 1, D, device=DEV, generator=g).to(FP16))
        out.fill_(float("nan"))
        graph.replay()
        plain.append(kn, vn)
        assert torch.equal(out, plain.attend(q)), f"replay {i}"
    assert_same_contents(fused, plain)
    assert_summaries_exact(fused)


# -- 8-bit (e4m3) page summaries --------------------------------------------------------
def codes(t):
    """e4m3 tensors compared by their bytes (torch.equal does not take float8)."""
    return t.view(torch.uint8)


@pytest.mark.parametrize("D,dtype", [(64, BF16), (128, BF16), (256, BF16), (128, torch.float16)])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -3])
def test_page_summaries_e4m3(D, dtype, scale):
    """hydra.page_summaries(dtype=float8_e4m3fn) writes the reference's codes exactly:
    min rounded down and max rounded up, saturated values at +-448, empty pages 448 /
    -448, ragged lengths and left padding with NaN outside them."""
    _need_ops()
    B, H, T, P = 3, 2, 3001, 16
    g = torch.Generator(device=DEV).manual_seed(D + int(1 / scale))
    # keys over 11 octaves (e4m3 subnormals, normals and saturation at scale 1), both signs
    k = (torch.randn(B, H, T, D, device=DEV, generator=g)
         * torch.exp2(torch.randint(-9, 11, (B, H, T, D), device=DEV, generator=g).float())).to(dtype)
    lens = torch.tensor([T, 1000, 17], dtype=torch.int32, device=DEV)
    pad = torch.tensor([0, 3, 9], dtype=torch.int32, device=DEV)
    poison_past(k, k.clone(), lens)
    for lp in (None, pad):
        if lp is not None:  # NaN before the first valid token, never read
            k[1, :, :3] = float("nan")
            k[2, :, :9] = float("nan")
        got = hydra.page_summaries(k, page_size=P, cache_seqlens=lens, cache_leftpad=lp, dtype=torch.float8_e4m3fn,
                                   scale=scale)
        assert got.dtype == torch.float8_e4m3fn
        want = ref.page_summaries(k, page_size=P, cache_seqlens=lens, cache_leftpad=lp, dtype=torch.float8_e4m3fn,
                                  scale=scale)
        assert torch.equal(codes(got), codes(want)), "e4m3 summaries differ from the reference's codes"
        exact = ref.page_summaries(k, page_size=P, cache_seqlens=lens, cache_leftpad=lp).float() * scale
        dec = ref.decode_summaries(got)
        filled = exact[..., 0, :] <= exact[..., 1, :]
        assert torch.all((dec[..., 0, :] <= exact[..., 0, :]) | ~filled), "a stored min is above the true min"
        assert torch.all((dec[..., 1, :] >= exact[..., 1, :]) | ~filled), "a stored max is below the true max"
    if scale == 1.0:  # keys up to ~2^12 here: some pages saturate
        assert bool((codes(got) & 0x7F == 0x7E).any())


@pytest.mark.parametrize("D,Hq,Hkv,dtype", [(128, 32, 8, BF16), (64, 9, 3, BF16), (256, 16, 2, BF16),
                                            (128, 12, 3, torch.float16)])
def test_e4m3_summaries_select_and_attend(D, Hq, Hkv, dtype):
    """Flat and coarse-to-fine selection from e4m3 summaries: the kernel's pages follow the
    reference's scores of the same codes (near-ties aside), and the output matches the
    fp32 reference over them. A coarse-to-fine call without summaries builds e4m3 ones
    when the policy says so."""
    _need_ops()
    B, T = 2, 40011
    q, k, v = make_qkv(B, Hq, Hkv, T, D=D, seed=T + D + Hq, slack=8, dtype=dtype)
    lens = torch.tensor([T, 20000], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    pol = hydra.HydraPolicy(budget_tokens=2048, summary_dtype="fp8_e4m3")
    summ = hydra.page_summaries(k, cache_seqlens=lens, dtype=torch.float8_e4m3fn)
    kz = k.nan_to_num(0.0)
    out = nan_like(q)
    o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=summ, out=out)
    pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=summ)
    check_selection(pages, q, kz, pol, lens=lens, summaries=summ)
    check_output(o, q, k, v, mask_from_pages(pages, T, 16, lens))
    # coarse-to-fine over e4m3 page and superpage summaries
    cpol = hydra.HydraPolicy(page_size=8, budget_tokens=1024, superpage=16, shortlist=2, summary_dtype="fp8_e4m3")
    s8 = hydra.page_summaries(k, page_size=8, cache_seqlens=lens, dtype=torch.float8_e4m3fn)
    sup = hydra.superpage_summaries(s8, 16)
    assert sup.dtype == torch.float8_e4m3fn
    # rounding commutes with min/max: superpages of codes are the codes of 128-token pages
    assert torch.equal(codes(sup), codes(ref.page_summaries(k, page_size=128, cache_seqlens=lens,
                                                            dtype=torch.float8_e4m3fn)))
    pages_c = hydra.select_pages(q, k, policy=cpol, cache_seqlens=lens, page_summaries=s8, superpage_summaries=sup)
    want = ref.select_pages(q, kz, policy=cpol, cache_seqlens=lens, page_summaries=s8, superpage_summaries=sup)
    assert torch.equal(pages_c, want), "coarse-to-fine selection over e4m3 summaries differs from the reference"
    assert torch.equal(hydra.select_pages(q, k, policy=cpol, cache_seqlens=lens), pages_c)  # builds e4m3 itself
    o_c = hydra.hydra(q, k, v, policy=cpol, cache_seqlens=lens, page_summaries=s8, superpage_summaries=sup,
                      out=nan_like(q))
    check_output(o_c, q, k, v, mask_from_pages(pages_c, T, 8, lens))


def page_means(k, lens, P):
    """(B, Hkv, n_pages, D) fp32 mean of each page's keys below lens[b] (0 for empty pages)."""
    B, Hkv, T, D = k.shape
    n = -(-T // P)
    valid = (torch.arange(n * P, device=k.device).view(1, -1) < lens.view(-1, 1)).view(B, 1, n, P, 1)
    kp = torch.nn.functional.pad(k.float().nan_to_num(0.0), (0, 0, 0, n * P - T)).view(B, Hkv, n, P, D)
    return (kp * valid).sum(3) / valid.sum(3).clamp_min(1)


@pytest.mark.parametrize("D,Hq,Hkv,dtype", [(128, 32, 8, BF16), (64, 9, 3, BF16), (256, 16, 2, torch.float16)])
def test_mean_summaries_select_by_page_means(D, Hq, Hkv, dtype):
    """README's recipe: summaries holding each page's mean key as both min and max (16-bit
    and e4m3) make the kernels rank pages by the group's query . mean; their pages follow
    the reference's (near-ties aside) and the output matches fp32 over them."""
    _need_ops()
    B, T, P = 2, 40011, 16
    q, k, v = make_qkv(B, Hq, Hkv, T, D=D, seed=T + 3 * D + Hq, slack=8, dtype=dtype)
    lens = torch.tensor([T, 23337], dtype=torch.int32, device=DEV)
    poison_past(k, v, lens)
    pol = hydra.HydraPolicy(budget_tokens=2048)
    mu = page_means(k, lens, P)
    qs = q.float().view(B, Hkv, Hq // Hkv, D).sum(2)
    for m in (mu.to(dtype), mu.clamp(-448, 448).to(torch.float8_e4m3fn)):
        summ = torch.stack([m, m], dim=3)
        want = torch.einsum("bhd,bhnd->bhn", qs, m.float())
        got = ref.page_scores(q, summ, cache_seqlens=lens, page_size=P)
        live = torch.isfinite(got)
        assert torch.allclose(got[live], want[live], rtol=1e-4, atol=1e-3), "the bound of (m, m) is not q . m"
        out = nan_like(q)
        o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=summ, out=out)
        pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=summ)
        check_selection(pages, q, k.nan_to_num(0.0), pol, lens=lens, summaries=summ)
        check_output(o, q, k, v, mask_from_pages(pages, T, P, lens))


def test_e4m3_summaries_find_a_planted_key():
    """A key aligned with the group's queries, planted in an old page of every KV head, is
    selected from e4m3 summaries as from exact ones (at 131,072 tokens, "high")."""
    _need_ops()
    T, H, G = 131072, 8, 4
    q, k, v = make_qkv(1, H * G, H, T, seed=98)
    page = 3001
    qg = q[0, :, 0].float().view(H, G, -1).mean(1)  # (H, D)
    k[0, :, page * 16 + 5] = (4 * qg / qg.norm(dim=-1, keepdim=True) * qg.shape[-1] ** 0.5).to(k.dtype)
    for dtype in (None, torch.float8_e4m3fn):
        pages = hydra.select_pages(q, k, page_summaries=hydra.page_summaries(k, dtype=dtype))
        for h in range(H):
            assert page in pages[0, h].tolist(), f"summaries {dtype}: head {h} missed the planted page"
