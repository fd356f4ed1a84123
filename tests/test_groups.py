"""Issue 9's matrix: every (element type, head dim, GQA group) combination, on the GPU.

bf16 and fp16, D = 64, 128 and 256, groups 1 to 16 (3, 5, 6, 7 and the other
non-powers of two included): 96 combinations, each through decode (the fused short
step and the score + select path, cached summaries and stateless), causal prefill and
the KV cache's fused step. Fresh random inputs on awkward lengths, outputs poisoned with
NaN before each run, kernels compared with the fp32 reference (test_gpu's and
test_prefill's checks). The other GPU modules test each path in depth on a few shapes;
this one makes sure no combination is left out.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

hydra = pytest.importorskip("hydra")
ref = hydra.reference

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128, 256]
GROUPS = list(range(1, 17))
MATRIX = [pytest.param(dt, D, G, id=f"{str(dt).split('.')[-1]}-D{D}-G{G}")
          for dt in DTYPES for D in HEAD_DIMS for G in GROUPS]


def _kv_heads(G):
    return 2 if G <= 8 else 1


@pytest.mark.parametrize("dtype,D,G", MATRIX)
def test_decode_every_group(dtype, D, G, kernel_probe):
    """Decode at two lengths: 2,311 tokens (145 pages: the fused short step) and 17,011
    (1,064 pages: the score kernel and the one-CTA select), ragged, NaN past the lengths.
    The probe checks that each length took its path."""
    from test_gpu import _need_ops, check_output, check_selection, make_qkv, mask_from_pages, nan_like, poison_past

    _need_ops()
    Hkv = _kv_heads(G)
    pol = hydra.HydraPolicy(page_size=16, budget_tokens=512, sink_tokens=32, recent_tokens=128)
    for T, short in ((2311, 1203), (17011, 9001)):
        q, k, v = make_qkv(2, G * Hkv, Hkv, T, D=D, seed=T + 31 * D + G, slack=8, dtype=dtype)
        lens = torch.tensor([T, short], dtype=torch.int32, device=DEV)
        poison_past(k, v, lens)
        summ = hydra.page_summaries(k, cache_seqlens=lens)
        assert torch.equal(summ, ref.page_summaries(k, page_size=16, cache_seqlens=lens)), f"T={T}: summaries"
        for s in (summ, None):
            with kernel_probe() as names:
                o = hydra.hydra(q, k, v, policy=pol, cache_seqlens=lens, page_summaries=s, out=nan_like(q))
            if names is not None and s is not None:
                ran = " ".join(names)
                want = ("short_step_kernel",) if T == 2311 else ("score_pages_kernel", "select_pages_kernel")
                assert all(w in ran for w in want) and (T == 2311) == ("short_step_kernel" in ran), \
                    f"T={T}: launched {sorted(n for n in names if 'hydra' in n)}"
            assert o.dtype == dtype
            pages = hydra.select_pages(q, k, policy=pol, cache_seqlens=lens, page_summaries=s)
            check_selection(pages, q, k.nan_to_num(0.0), pol, lens=lens, summaries=summ)
            check_output(o, q, k, v, mask_from_pages(pages, T, 16, lens))


@pytest.mark.parametrize("dtype,D,G", MATRIX)
def test_prefill_every_group(dtype, D, G):
    """Causal prefill over 1,347 tokens (past the 1,024-token budget, so blocks are
    selected; a partial last block): block lists and output against the fp32 reference."""
    from test_prefill import POL, blocks_to_mask, check_blocks, kernel_blocks, make, reference_with_blocks, rel_err

    from test_gpu import _need_ops

    _need_ops()
    T, Hkv = 1347, _kv_heads(G)
    q, k, v = make(1, G * Hkv, Hkv, T, D=D, seed=T + 17 * D + G, dtype=dtype)
    o = hydra.hydra(q, k, v, policy=POL, out=torch.full_like(q, float("nan")))
    assert not torch.isnan(o).any()
    blocks = kernel_blocks(q, k, POL)
    check_blocks(blocks, q, k, POL)
    o_ref = reference_with_blocks(q, k, v, blocks_to_mask(blocks, -(-T // 64)))[0]
    assert rel_err(o, o_ref) < 1e-2


@pytest.mark.parametrize("dtype,D,G", MATRIX)
def test_cache_step_every_group(dtype, D, G):
    """HydraKVCache: prefill of ragged lengths, then fused steps equal append + attend
    bitwise, the summaries stay exact, and the last step matches the fp32 reference."""
    from test_cache import assert_same_contents, assert_summaries_exact, check_against_reference

    from test_gpu import _need_ops

    _need_ops()
    B, H = 2, _kv_heads(G)
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=128, sink_tokens=8, recent_tokens=24)
    fused, plain = (hydra.HydraKVCache(B, H, D, 640, dtype=dtype, device=DEV, policy=pol) for _ in range(2))
    g = torch.Generator(device=DEV).manual_seed(1000 + D + G)

    def rnd(*shape):
        return torch.randn(*shape, device=DEV, generator=g).to(dtype)

    lens = torch.tensor([533, 301], dtype=torch.int32, device=DEV)
    k, v = rnd(B, H, 533, D), rnd(B, H, 533, D)
    fused.prefill(k, v, seqlens=lens)
    plain.prefill(k, v, seqlens=lens)
    for i in range(3):
        q, kn, vn = rnd(B, G * H, 1, D), rnd(B, H, 1, D), rnd(B, H, 1, D)
        got = fused.step(q, kn, vn, out=torch.full_like(q, float("nan")))
        plain.append(kn, vn)
        assert torch.equal(got, plain.attend(q)), f"step {i}: fused output differs from append + attend"
    assert_same_contents(fused, plain)
    assert_summaries_exact(fused)
    pages = hydra.select_pages(q, fused.k, policy=pol, cache_seqlens=fused.seqlens, page_summaries=fused.summaries)
    check_against_reference(fused, q, got, pages, pol)
