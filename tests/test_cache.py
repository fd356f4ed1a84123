"""HydraKVCache: prefill and append keep K/V and the page summaries exactly what a
from-scratch computation gives (min/max are exact, so bitwise), ragged appends,
page-boundary crossings, overflow, CUDA-graph replay of a whole decode step, and
attend parity with the fp32 reference."""

from __future__ import annotations

import pytest
import torch

import hydra

ref = hydra.reference
BF16 = torch.bfloat16
DEV = "cuda"


def rand(*shape, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, device=DEV, generator=g).to(BF16)


def assert_summaries_exact(cache):
    """The cache's summaries equal page_summaries recomputed from its K and lengths
    (an empty sequence: every page +inf / -inf)."""
    P = cache.policy.page_size
    fp8 = cache.summaries.dtype == torch.float8_e4m3fn
    bits = (lambda t: t.view(torch.uint8)) if fp8 else (lambda t: t)  # e4m3: compare the codes
    empty = 448.0 if fp8 else float("inf")
    for b, L in enumerate(cache.seqlens.tolist()):
        got = cache.summaries[b:b + 1]
        if L == 0:
            assert torch.all(got[..., 0, :].float() == empty) and torch.all(got[..., 1, :].float() == -empty)
            continue
        want = ref.page_summaries(cache.k[b:b + 1], page_size=P, cache_seqlens=cache.seqlens[b:b + 1],
                                  dtype=cache.summaries.dtype, scale=cache.summary_scale)
        assert torch.equal(bits(got), bits(want)), f"sequence {b}: incremental summaries differ from a recomputation"
    if cache.superpage_summaries is not None:
        want = ref.superpage_summaries(cache.summaries, cache.policy.superpage)
        assert torch.equal(bits(cache.superpage_summaries), bits(want)), \
            "superpage summaries differ from a recomputation"


def test_constructor_errors():
    with pytest.raises(ValueError, match="hydra: HydraKVCache max_seq_len must be a positive int, got 0"):
        hydra.HydraKVCache(1, 8, 128, 0)
    with pytest.raises(ValueError, match="hydra: HydraKVCache head_dim must be one of"):
        hydra.HydraKVCache(1, 8, 96, 1024)
    with pytest.raises(TypeError, match="hydra: HydraKVCache dtype must be bf16 or fp16, got torch.float32"):
        hydra.HydraKVCache(1, 8, 128, 1024, dtype=torch.float32)
    with pytest.raises(ValueError, match="hydra: HydraKVCache needs a CUDA device, got cpu"):
        hydra.HydraKVCache(1, 8, 128, 1024, device="cpu")
    with pytest.raises(ValueError, match="hydra: precision must be one of"):
        hydra.HydraKVCache(1, 8, 128, 1024, precision="turbo")


@pytest.mark.gpu
@pytest.mark.kernels_ci
@pytest.mark.parametrize("P", [8, 16, 64])
def test_prefill_then_appends_match_recomputation(P):
    B, H, D, T0 = 3, 2, 128, 45
    pol = hydra.HydraPolicy(page_size=P, budget_tokens=8 * P, sink_tokens=P, recent_tokens=2 * P)
    cache = hydra.HydraKVCache(B, H, D, 300, device=DEV, policy=pol)
    k, v = rand(B, H, T0, D, seed=1), rand(B, H, T0, D, seed=2)
    lens = torch.tensor([T0, 17, 1], dtype=torch.int32, device=DEV)
    cache.prefill(k, v, seqlens=lens)
    assert torch.equal(cache.seqlens, lens)
    for b, L in enumerate(lens.tolist()):
        assert torch.equal(cache.k[b, :, :L], k[b, :, :L]) and torch.equal(cache.v[b, :, :L], v[b, :, :L])
    assert_summaries_exact(cache)
    expect = lens.clone()
    for step in range(40):  # one token at a time, crossing page boundaries
        kn, vn = rand(B, H, 1, D, seed=100 + step), rand(B, H, 1, D, seed=200 + step)
        cache.append(kn, vn)
        for b in range(B):
            L = int(expect[b])
            assert torch.equal(cache.k[b, :, L], kn[b, :, 0]) and torch.equal(cache.v[b, :, L], vn[b, :, 0])
        expect += 1
        assert torch.equal(cache.seqlens, expect)
        if step % 7 == 0 or step == 39:
            assert_summaries_exact(cache)


@pytest.mark.gpu
@pytest.mark.parametrize("summary_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("superpage", [0, 4])
def test_ragged_multi_token_appends(superpage, summary_dtype):
    B, H, D = 3, 2, 128
    pol = hydra.HydraPolicy(superpage=superpage, summary_dtype=summary_dtype, summary_scale=0.25)
    cache = hydra.HydraKVCache(B, H, D, 200, device=DEV, policy=pol)
    if summary_dtype == "fp8_e4m3":
        assert cache.summaries.dtype == torch.float8_e4m3fn
    assert (cache.superpage_summaries is not None) == (superpage > 0)
    cache.prefill(rand(B, H, 30, D, seed=3), rand(B, H, 30, D, seed=4))
    expect = torch.full((B,), 30, dtype=torch.int32, device=DEV)
    for step, counts in enumerate(([0, 5, 16], [33, 0, 1], [7, 7, 7])):
        n = max(counts)
        kn, vn = rand(B, H, n, D, seed=10 + step), rand(B, H, n, D, seed=20 + step)
        c = torch.tensor(counts, dtype=torch.int32, device=DEV)
        before = cache.seqlens.clone()
        cache.append(kn, vn, counts=c)
        for b in range(B):
            L, m = int(before[b]), counts[b]
            assert torch.equal(cache.k[b, :, L:L + m], kn[b, :, :m])
            assert torch.equal(cache.v[b, :, L:L + m], vn[b, :, :m])
        expect += c
        assert torch.equal(cache.seqlens, expect)
        assert_summaries_exact(cache)


@pytest.mark.gpu
def test_overflow_is_refused_or_flagged():
    B, H, D = 2, 1, 128
    cache = hydra.HydraKVCache(B, H, D, 40, device=DEV)
    cache.prefill(rand(B, H, 38, D, seed=5), rand(B, H, 38, D, seed=6))
    with pytest.raises(ValueError, match="hydra: appending 3 token\\(s\\) to sequences of 38 would pass max_seq_len=40"):
        cache.append(rand(B, H, 3, D, seed=7), rand(B, H, 3, D, seed=8))
    assert torch.equal(cache.seqlens, torch.tensor([38, 38], dtype=torch.int32, device=DEV))
    # Ragged: the host cannot know, so the kernel drops the excess and raises the device flag.
    c = torch.tensor([1, 3], dtype=torch.int32, device=DEV)
    cache.append(rand(B, H, 3, D, seed=9), rand(B, H, 3, D, seed=10), counts=c)
    assert cache.seqlens.tolist() == [39, 40]
    with pytest.raises(ValueError, match="hydra: an append passed max_seq_len=40"):
        cache.check_overflow()
    assert_summaries_exact(cache)


@pytest.mark.gpu
@pytest.mark.parametrize("summary_dtype", ["auto", "fp8_e4m3"])
def test_reset_and_memory_bytes(summary_dtype):
    B, H, D = 3, 2, 128
    cache = hydra.HydraKVCache(B, H, D, 100, device=DEV, policy=hydra.HydraPolicy(summary_dtype=summary_dtype))
    cache.prefill(rand(B, H, 50, D, seed=11), rand(B, H, 50, D, seed=12))
    cache.reset([1])
    assert cache.seqlens.tolist() == [50, 0, 50]
    assert_summaries_exact(cache)
    cache.append(rand(B, H, 2, D, seed=13), rand(B, H, 2, D, seed=14))
    assert cache.seqlens.tolist() == [52, 2, 52]
    assert_summaries_exact(cache)
    n_pages = -(-100 // 16)
    summary_bytes = 1 if summary_dtype == "fp8_e4m3" else 2  # e4m3 summaries: half the memory
    expected = 2 * B * H * 100 * D * 2 + B * H * n_pages * 2 * D * summary_bytes + B * 4 + 4
    assert cache.memory_bytes() == expected


@pytest.mark.gpu
@pytest.mark.kernels_ci
def test_attend_matches_reference():
    from test_gpu import check_output, check_selection, mask_from_pages

    B, Hq, H, D, T = 2, 8, 2, 128, 5000
    cache = hydra.HydraKVCache(B, H, D, 6000, device=DEV)
    k, v = rand(B, H, T, D, seed=15), rand(B, H, T, D, seed=16)
    lens = torch.tensor([T, 4500], dtype=torch.int32, device=DEV)
    cache.prefill(k, v, seqlens=lens)
    q = rand(B, Hq, 1, D, seed=17)
    out = cache.attend(q, out=torch.full_like(q, float("nan")))
    pages = hydra.select_pages(q, cache.k, cache_seqlens=cache.seqlens, page_summaries=cache.summaries)
    kk, vv = cache.k.clone(), cache.v.clone()
    for b, L in enumerate(lens.tolist()):  # never-written positions must not matter
        kk[b, :, L:] = 0
        vv[b, :, L:] = 0
    check_selection(pages, q, kk, cache.policy, lens=lens, summaries=cache.summaries)
    check_output(out, q, kk, vv, mask_from_pages(pages, cache.max_seq_len, 16, lens))


@pytest.mark.gpu
@pytest.mark.kernels_ci
def test_graph_replay_of_a_decode_step_stack():
    """append + attend for every layer of a 2-layer stack, captured once, replayed
    while lengths grow across page boundaries; each replay equals an eager attend."""
    B, Hq, H, D, layers = 2, 8, 2, 128, 2
    pol = hydra.HydraPolicy(budget_tokens=64, sink_tokens=16, recent_tokens=16)
    caches = [hydra.HydraKVCache(B, H, D, 256, device=DEV, policy=pol) for _ in range(layers)]
    for i, c in enumerate(caches):
        c.prefill(rand(B, H, 60, D, seed=30 + i), rand(B, H, 60, D, seed=40 + i),
                  seqlens=torch.tensor([60, 45], dtype=torch.int32, device=DEV))
    q = rand(B, Hq, 1, D, seed=50)
    k_new, v_new = rand(B, H, 1, D, seed=51), rand(B, H, 1, D, seed=52)
    outs = [torch.empty_like(q) for _ in range(layers)]

    def step():
        for c, o in zip(caches, outs):
            c.append(k_new, v_new)
            c.attend(q, out=o)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture runs nothing: no length moves here
        step()
    for i in range(30):
        q.copy_(rand(B, Hq, 1, D, seed=60 + i))
        k_new.copy_(rand(B, H, 1, D, seed=90 + i))
        v_new.copy_(rand(B, H, 1, D, seed=120 + i))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for c, o in zip(caches, outs):
            assert c.seqlens.tolist() == [61 + i, 46 + i]
            assert torch.equal(o, c.attend(q)), f"replay {i} differs from eager"
    for c in caches:
        assert_summaries_exact(c)
        c.check_overflow()


@pytest.mark.gpu
def test_opcheck_cache_ops():
    from hydra import ops

    B, H, D = 2, 2, 128
    cache = hydra.HydraKVCache(B, H, D, 64, device=DEV)
    k, v = rand(B, H, 20, D, seed=70), rand(B, H, 20, D, seed=71)
    torch.library.opcheck(ops.cache_prefill.default,
                          (k, v, None, 16, cache.k, cache.v, cache.summaries, cache._lengths, cache._overflow, 1.0))
    kn, vn = rand(B, H, 2, D, seed=72), rand(B, H, 2, D, seed=73)
    counts = torch.tensor([1, 2], dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.cache_append.default,
                          (kn, vn, counts, 16, cache.k, cache.v, cache.summaries, None, 0, cache._lengths,
                           cache._overflow, 1.0))



# -- HydraKVCache.step: append + attend fused into the selection kernels -------------

def assert_same_contents(a, b):
    """Equal lengths, K/V below them (the rest was never written) and summaries."""
    assert torch.equal(a.seqlens, b.seqlens)
    for i, L in enumerate(a.seqlens.tolist()):
        assert torch.equal(a.k[i, :, :L], b.k[i, :, :L]) and torch.equal(a.v[i, :, :L], b.v[i, :, :L])
    bits = (lambda t: t.view(torch.uint8)) if a.summaries.dtype == torch.float8_e4m3fn else (lambda t: t)
    assert torch.equal(bits(a.summaries), bits(b.summaries))
    if a.superpage_summaries is not None:
        assert torch.equal(bits(a.superpage_summaries), bits(b.superpage_summaries))


def check_against_reference(cache, q, got, pages, pol):
    """The cache's selected pages follow the reference's rules and `got` (a step's output)
    matches the fp32 reference over them; positions past each length are zeroed first."""
    from test_gpu import check_output, check_selection, mask_from_pages

    kk, vv = cache.k.clone(), cache.v.clone()
    for b, L in enumerate(cache.seqlens.tolist()):
        kk[b, :, L:] = 0
        vv[b, :, L:] = 0
    check_selection(pages, q, kk, pol, lens=cache.seqlens, summaries=cache.summaries)
    check_output(got, q, kk, vv, mask_from_pages(pages, cache.max_seq_len, pol.page_size, cache.seqlens))


STEP_CASES = {
    # selecting, the usual case: the new token's page is always in the recent window
    "select": dict(policy=hydra.HydraPolicy(page_size=16, budget_tokens=128, sink_tokens=16, recent_tokens=32)),
    # recent_tokens=0: the page the new token completes is a scored candidate
    "no_recent": dict(policy=hydra.HydraPolicy(page_size=8, budget_tokens=64, sink_tokens=8, recent_tokens=0)),
    # coarse-to-fine: superpage summaries maintained by the fused append too
    "coarse": dict(policy=hydra.HydraPolicy(page_size=8, budget_tokens=96, sink_tokens=8, recent_tokens=16,
                                            superpage=4, shortlist=1)),
    # coarse-to-fine with no recent window: the new token's superpage can be a candidate
    "coarse_no_recent": dict(policy=hydra.HydraPolicy(page_size=8, budget_tokens=64, sink_tokens=8,
                                                      recent_tokens=0, superpage=2, shortlist=2)),
    # e4m3 summaries (HydraPolicy.summary_dtype): the fused append writes codes rounded
    # outward, and the scorer folds the new key the same way
    "select_fp8": dict(policy=hydra.HydraPolicy(page_size=16, budget_tokens=128, sink_tokens=16, recent_tokens=32,
                                                summary_dtype="fp8_e4m3", summary_scale=0.5)),
    "no_recent_fp8": dict(policy=hydra.HydraPolicy(page_size=8, budget_tokens=64, sink_tokens=8, recent_tokens=0,
                                                   summary_dtype="fp8_e4m3")),
    "coarse_no_recent_fp8": dict(policy=hydra.HydraPolicy(page_size=8, budget_tokens=64, sink_tokens=8,
                                                          recent_tokens=0, superpage=2, shortlist=2,
                                                          summary_dtype="fp8_e4m3", summary_scale=4.0)),
    # paths without selection: one append launch, then the attention
    "exact": dict(precision="exact"),
    "window": dict(sliding_window=40),
}


@pytest.mark.gpu
@pytest.mark.kernels_ci
@pytest.mark.parametrize("fast", [False, True], ids=["checked", "fast"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_equals_append_then_attend(case, fast, monkeypatch):
    """step() leaves the cache exactly as append() does and returns exactly attend()'s
    output, across page boundaries, with ragged lengths (one sequence within the budget).
    "fast": the step's one-op path (the output allocated by the op on even steps, a
    given out= and return_lse on odd ones), which must not reach the checked path;
    "checked": precision given, which only the checked path takes."""
    kw = dict(STEP_CASES[case])
    pol = kw.pop("policy", None)
    precision = kw.pop("precision", "high")
    B, Hq, H, D, T0, steps = 3, 12, 3, 128, 230, 37
    fused, plain = (hydra.HydraKVCache(B, H, D, 400, device=DEV, policy=pol, precision=precision) for _ in range(2))
    if fast:
        def checked_path(*args, **kwargs):
            raise AssertionError("the step took the checked path")

        monkeypatch.setattr(hydra, "_cache_step", checked_path)
    lens = torch.tensor([T0, 171, 40], dtype=torch.int32, device=DEV)
    k, v = rand(B, H, T0, D, seed=300), rand(B, H, T0, D, seed=301)
    fused.prefill(k, v, seqlens=lens)
    plain.prefill(k, v, seqlens=lens)
    for i in range(steps):
        q = rand(B, Hq, 1, D, seed=400 + i)
        kn, vn = rand(B, H, 1, D, seed=500 + i), rand(B, H, 1, D, seed=600 + i)
        lse = None
        if fast and i % 2 == 0:
            got = fused.step(q, kn, vn, **kw)
        elif fast:
            given = torch.full_like(q, float("nan"))  # poisoned: every element must be written
            got, lse = fused.step(q, kn, vn, out=given, return_lse=True, **kw)
            assert got is given, "out= was not written in place"
        else:
            got = fused.step(q, kn, vn, precision=precision, out=torch.full_like(q, float("nan")), **kw)
        plain.append(kn, vn)
        want, want_lse = plain.attend(q, return_lse=True, **kw)
        assert not torch.isnan(got).any()
        assert torch.equal(got, want), f"step {i}: fused output differs from append + attend"
        assert lse is None or torch.equal(lse, want_lse), f"step {i}: fused LSE differs from attend's"
        assert torch.equal(fused.seqlens, plain.seqlens)
    assert torch.equal(fused.seqlens, lens + steps)
    assert_same_contents(fused, plain)
    assert_summaries_exact(fused)
    if pol is not None:  # and against the fp32 reference, on the last step
        pages = hydra.select_pages(q, fused.k, policy=pol, cache_seqlens=fused.seqlens,
                                   page_summaries=fused.summaries, superpage_summaries=fused.superpage_summaries)
        assert torch.equal(pages, ref.select_pages(q, fused.k, policy=pol, cache_seqlens=fused.seqlens,
                                                   page_summaries=fused.summaries,
                                                   superpage_summaries=fused.superpage_summaries))
        check_against_reference(fused, q, got, pages, pol)


@pytest.mark.gpu
@pytest.mark.parametrize("recent,summary_dtype", [(32, "auto"), (0, "auto"), (0, "fp8_e4m3")])
def test_step_through_the_cluster_selection(recent, summary_dtype, kernel_probe):
    """Long rows (>= 16,384 pages) on sm_90+ select in one cluster launch, with the fused
    append done by its first CTA (16-bit summaries) or by the e4m3 scorer launched before
    it. step() still equals append() + attend(), across a page boundary (with
    recent_tokens=0 the page the new token completes is a scored candidate), and matches
    the fp32 reference."""
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=1024, sink_tokens=8, recent_tokens=recent,
                            summary_dtype=summary_dtype)
    B, Hq, H, D, max_len, steps = 2, 8, 2, 128, 131080, 11
    fused, plain = (hydra.HydraKVCache(B, H, D, max_len, device=DEV, policy=pol) for _ in range(2))
    lens = torch.tensor([max_len - 40, 5003], dtype=torch.int32, device=DEV)
    k, v = rand(B, H, max_len - 40, D, seed=700), rand(B, H, max_len - 40, D, seed=701)
    fused.prefill(k, v, seqlens=lens)
    plain.prefill(k, v, seqlens=lens)
    names = set()
    for i in range(steps):
        q = rand(B, Hq, 1, D, seed=800 + i)
        kn, vn = rand(B, H, 1, D, seed=900 + i), rand(B, H, 1, D, seed=1000 + i)
        with kernel_probe() as launched:
            got = fused.step(q, kn, vn, out=torch.full_like(q, float("nan")))
        names = None if launched is None else names | launched
        plain.append(kn, vn)
        want = plain.attend(q)
        assert not torch.isnan(got).any()
        assert torch.equal(got, want), f"step {i}: fused output differs from append + attend"
    if names is not None and torch.cuda.get_device_capability()[0] >= 9:
        assert any("score_select_cluster_kernel" in n for n in names), sorted(names)
    assert torch.equal(fused.seqlens, lens + steps)
    assert_same_contents(fused, plain)
    assert_summaries_exact(fused)
    pages = hydra.select_pages(q, fused.k, policy=pol, cache_seqlens=fused.seqlens, page_summaries=fused.summaries)
    check_against_reference(fused, q, got, pages, pol)


@pytest.mark.gpu
@pytest.mark.kernels_ci
def test_graph_replay_of_fused_steps():
    """step() for every layer of a 2-layer stack, captured once and replayed while the
    lengths cross page boundaries; each replay equals an eager append + attend."""
    B, Hq, H, D, layers = 2, 8, 2, 128, 2
    pol = hydra.HydraPolicy(budget_tokens=64, sink_tokens=16, recent_tokens=16)
    caches = [hydra.HydraKVCache(B, H, D, 256, device=DEV, policy=pol) for _ in range(layers)]
    twins = [hydra.HydraKVCache(B, H, D, 256, device=DEV, policy=pol) for _ in range(layers)]
    for i, (c, t) in enumerate(zip(caches, twins)):
        k, v = rand(B, H, 70, D, seed=700 + i), rand(B, H, 70, D, seed=710 + i)
        lens = torch.tensor([70, 52], dtype=torch.int32, device=DEV)
        c.prefill(k, v, seqlens=lens)
        t.prefill(k, v, seqlens=lens)
    q = rand(B, Hq, 1, D, seed=720)
    k_new, v_new = rand(B, H, 1, D, seed=721), rand(B, H, 1, D, seed=722)
    outs = [torch.empty_like(q) for _ in range(layers)]

    def step():
        for c, o in zip(caches, outs):
            c.step(q, k_new, v_new, out=o)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(25):
        q.copy_(rand(B, Hq, 1, D, seed=730 + i))
        k_new.copy_(rand(B, H, 1, D, seed=760 + i))
        v_new.copy_(rand(B, H, 1, D, seed=790 + i))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for c, t, o in zip(caches, twins, outs):
            t.append(k_new, v_new)
            assert c.seqlens.tolist() == [71 + i, 53 + i]
            assert torch.equal(o, t.attend(q)), f"replay {i} differs from eager append + attend"
    for c, t in zip(caches, twins):
        assert_same_contents(c, t)
        c.check_overflow()


LONG_CACHE = 40000  # max_seq_len of the long-cache tests, far past their prompts


def long_cache_twins(pol, seed):
    """Two caches of LONG_CACHE tokens (B = 2, Hkv = 2, D = 128) holding the same ragged
    prompt of 3,060 and 2,100 tokens, and a step's q (Hq = 8), k_new and v_new."""
    B, Hq, H, D = 2, 8, 2, 128
    caches = [hydra.HydraKVCache(B, H, D, LONG_CACHE, device=DEV, policy=pol) for _ in range(2)]
    lens = torch.tensor([3060, 2100], dtype=torch.int32, device=DEV)
    k, v = rand(B, H, 3060, D, seed=seed), rand(B, H, 3060, D, seed=seed + 1)
    for c in caches:
        c.prefill(k, v, seqlens=lens)
    return (*caches, rand(B, Hq, 1, D, seed=seed + 2), rand(B, H, 1, D, seed=seed + 3),
            rand(B, H, 1, D, seed=seed + 4))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["select", "coarse", "select_fp8"])
def test_eager_steps_over_a_long_cache_read_views(case):
    """Eager steps over a cache far longer than its sequences run their kernels over views
    of the first tokens (HydraKVCache._operands). They give the same outputs, bit for bit,
    and the same cache contents as a graph-captured twin, whose replays read the whole
    buffers. After the replays the twin's host no longer knows its lengths, so its eager
    steps read the whole buffers too, and still agree."""
    B, Hq, H, D = 2, 8, 2, 128
    pol = STEP_CASES[case]["policy"]
    long, twin, q, k_new, v_new = long_cache_twins(pol, seed=900)
    out_g = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture runs nothing
        twin.step(q, k_new, v_new, out=out_g)
    assert not twin._bound_known, "a captured step must forget the host's length bound"
    views_seen = set()
    for i in range(40):  # the lengths cross a view boundary at 3,072 tokens
        q.copy_(rand(B, Hq, 1, D, seed=910 + i))
        k_new.copy_(rand(B, H, 1, D, seed=960 + i))
        v_new.copy_(rand(B, H, 1, D, seed=1010 + i))
        out_g.fill_(float("nan"))
        graph.replay()
        o = long.step(q, k_new, v_new, out=torch.full_like(q, float("nan")))
        assert torch.equal(o, out_g), f"step {i}: the eager step over views differs from the replay"
        views_seen.add(long._views[0])
    # Views grow by 64 pages: 3,072 then 4,096 tokens at 16-token pages, 3,072 then 3,584 at 8.
    assert views_seen == {3072, 3072 + 64 * pol.page_size}, f"views read: {sorted(views_seen)} (of {LONG_CACHE})"
    assert long.seqlens.tolist() == [3100, 2140]
    assert_same_contents(long, twin)
    # The twin's eager steps now read the whole buffers; both agree, and match the reference.
    for i in range(2):
        q.copy_(rand(B, Hq, 1, D, seed=1100 + i))
        o_long, o_twin = long.step(q, k_new, v_new), twin.step(q, k_new, v_new)
        assert twin._views is None and torch.equal(o_long, o_twin)
    pages = hydra.select_pages(q, long.k, policy=pol, cache_seqlens=long.seqlens, page_summaries=long.summaries,
                               superpage_summaries=long.superpage_summaries)
    if not pol.coarse:
        check_against_reference(long, q, long.attend(q), pages, pol)
    assert_same_contents(long, twin)


@pytest.mark.gpu
def test_capture_tokens_bounds_what_replays_read():
    """A step captured inside capture_tokens(T) reads the first T tokens (rounded up to a
    page): its replays equal eager steps bit for bit while the lengths stay under T, and an
    append past T is dropped and flagged, as one past max_seq_len is. Bad T is refused."""
    B, Hq, H, D = 2, 8, 2, 128
    cap, twin, q, k_new, v_new = long_cache_twins(STEP_CASES["select"]["policy"], seed=1200)
    for bad in (0, LONG_CACHE + 1, 3.5, True):
        with pytest.raises(ValueError, match="capture_tokens"):
            with cap.capture_tokens(bad):
                pass
    out_g = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with cap.capture_tokens(3100), torch.cuda.graph(graph):  # 3,104 tokens: 194 pages of 16
        cap.step(q, k_new, v_new, out=out_g)
    assert cap._capture_tokens is None
    for i in range(44):  # up to 3,104 tokens in the first sequence: nothing dropped yet
        q.copy_(rand(B, Hq, 1, D, seed=1210 + i))
        k_new.copy_(rand(B, H, 1, D, seed=1260 + i))
        v_new.copy_(rand(B, H, 1, D, seed=1310 + i))
        out_g.fill_(float("nan"))
        graph.replay()
        o = twin.step(q, k_new, v_new)
        assert torch.equal(out_g, o), f"replay {i} differs from the eager step"
    assert cap.seqlens.tolist() == [3104, 2144]
    assert_same_contents(cap, twin)
    cap.check_overflow()
    graph.replay()  # the first sequence's token does not fit the captured 3,104
    torch.cuda.synchronize()
    assert cap.seqlens.tolist()[0] == 3104
    with pytest.raises(ValueError, match="passed max_seq_len"):
        cap.check_overflow()


@pytest.mark.gpu
def test_step_overflow_is_refused_or_flagged():
    B, Hq, H, D, M = 2, 4, 1, 128, 96  # M > budget: the step selects, so the append is fused
    pol = hydra.HydraPolicy(budget_tokens=64, sink_tokens=16, recent_tokens=16)
    cache = hydra.HydraKVCache(B, H, D, M, device=DEV, policy=pol)
    q = rand(B, Hq, 1, D, seed=800)
    kn, vn = rand(B, H, 1, D, seed=801), rand(B, H, 1, D, seed=802)
    cache.prefill(rand(B, H, M, D, seed=803), rand(B, H, M, D, seed=804))
    with pytest.raises(ValueError, match=f"hydra: appending 1 token to sequences of {M} would pass max_seq_len={M}"):
        cache.step(q, kn, vn)
    with pytest.raises(ValueError, match=r"hydra: HydraKVCache.step appends one token per sequence"):
        cache.step(q, rand(B, H, 2, D, seed=805), rand(B, H, 2, D, seed=806))
    # Ragged lengths: the host cannot know; the full sequence drops its token and flags it.
    cache.prefill(rand(B, H, M, D, seed=807), rand(B, H, M, D, seed=808),
                  seqlens=torch.tensor([M, M - 1], dtype=torch.int32, device=DEV))
    out = cache.step(q, kn, vn)
    assert cache.seqlens.tolist() == [M, M]
    assert torch.equal(cache.k[1, :, M - 1], kn[1, :, 0])
    assert torch.equal(out, cache.attend(q))
    with pytest.raises(ValueError, match=f"hydra: an append passed max_seq_len={M}"):
        cache.check_overflow()
    assert_summaries_exact(cache)


@pytest.mark.gpu
def test_opcheck_decode_append():
    from hydra import ops

    B, Hq, H, D = 2, 4, 2, 128
    pol = hydra.HydraPolicy(budget_tokens=64, sink_tokens=16, recent_tokens=16)
    cache = hydra.HydraKVCache(B, H, D, 128, device=DEV, policy=pol)
    cache.prefill(rand(B, H, 90, D, seed=810), rand(B, H, 90, D, seed=811))
    q = rand(B, Hq, 1, D, seed=812)
    kn, vn = rand(B, H, 1, D, seed=813), rand(B, H, 1, D, seed=814)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, 1, dtype=torch.float32, device=DEV)
    torch.library.opcheck(ops.decode_append.default,
                          (q, kn, vn, cache.k, cache.v, cache.summaries, None, cache._lengths, cache._overflow, 16,
                           0, 0, 16, 16, 64, 0, D ** -0.5, 1.0, out, lse))
    torch.library.opcheck(ops.decode_append_alloc.default,
                          (q, kn, vn, cache.k, cache.v, cache.summaries, None, cache._lengths, cache._overflow, 16,
                           0, 0, 16, 16, 64, 0, D ** -0.5, 1.0))


@pytest.mark.gpu
def test_fast_step_refusals_match_the_checked_step():
    """Bad input to step()'s one-op path: the same error as the checked path, and the
    cache is left as it was (the op refuses before it writes)."""
    B, Hq, H, D = 2, 4, 2, 128
    cache = hydra.HydraKVCache(B, H, D, 256, device=DEV)
    cache.prefill(rand(B, H, 200, D, seed=820), rand(B, H, 200, D, seed=821))
    q = rand(B, Hq, 1, D, seed=822)
    kn, vn = rand(B, H, 1, D, seed=823), rand(B, H, 1, D, seed=824)
    bad = {
        "q fp16": (q.half(), kn, vn),
        "q head dim": (rand(B, Hq, 1, 64, seed=825), kn, vn),
        "q rank": (q[:, :, 0], kn, vn),
        "q group": (rand(B, 34, 1, D, seed=826), kn, vn),
        "q batch": (q[:1], kn, vn),
        "two tokens": (q, rand(B, H, 2, D, seed=827), rand(B, H, 2, D, seed=828)),
        "k_new fp16": (q, kn.half(), vn),
        "v_new heads": (q, kn, vn[:, :1]),
        "k_new on cpu": (q, kn.cpu(), vn),
        "k_new not a tensor": (q, [1.0], vn),
    }
    bad_kwargs = {
        "out fp16": {"out": torch.empty_like(q).half()},
        "out shape": {"out": torch.empty_like(q[:, :2])},
        "out on cpu": {"out": torch.empty_like(q).cpu()},
    }
    bits = lambda t: t.view(torch.int16)  # noqa: E731  (bitwise: slots past the lengths are uninitialised)
    before = (cache.seqlens.clone(), bits(cache.k).clone(), bits(cache.summaries).clone())
    cases = [(name, args, {}) for name, args in bad.items()] + [(name, (q, kn, vn), kw) for name, kw in bad_kwargs.items()]
    for name, (qq, kk, vv), kw in cases:
        errors = []
        for extra in ({}, {"precision": "high"}):  # the one-op path, then the checked path
            with pytest.raises((ValueError, TypeError)) as info:
                cache.step(qq, kk, vv, **kw, **extra)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1], f"{name}: {errors}"
        assert torch.equal(cache.seqlens, before[0]) and torch.equal(bits(cache.k), before[1]) \
            and torch.equal(bits(cache.summaries), before[2]), f"{name}: the cache changed"
