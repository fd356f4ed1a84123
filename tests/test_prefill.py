"""GPU parity of the causal prefill kernels (block selection + block-sparse attention)
against hydra.reference, on fresh random inputs with awkward lengths; outputs are
poisoned with NaN before each run."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

hydra = pytest.importorskip("hydra")
ref = hydra.reference
DEV = "cuda"

# A selecting policy small enough that these lengths select: 16 blocks of 64 tokens,
# 1 sink block, 3 local blocks behind the diagonal.
POL = hydra.HydraPolicy(budget_tokens=1024, sink_tokens=64, recent_tokens=192, dense_layers=0)


def _need_ops():
    if hydra.ops is None:
        pytest.fail("the CUDA extension did not build on a GPU machine")


def make(B, Hq, Hkv, T, D=128, *, seed, dtype=torch.bfloat16, Tq=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, T if Tq is None else Tq, D, device=DEV, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, device=DEV, generator=g).to(dtype)
    return q, k, v


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def kernel_blocks(q, k, pol):
    from hydra import ops

    B, Hkv, T = q.shape[0], k.shape[1], q.shape[2]
    nb = -(-T // 64)
    blocks = torch.full((B, Hkv, nb, pol.budget_tokens // 64), -7, dtype=torch.int32, device=DEV)
    ops.prefill_blocks(q, k, pol.sink_tokens, pol.recent_tokens, pol.budget_tokens, blocks)
    return blocks


def blocks_to_mask(blocks, nb):
    """(B, Hkv, nbq, nb) bool from block lists."""
    B, Hkv, nbq, _ = blocks.shape
    m = torch.zeros(B, Hkv, nbq, nb + 1, dtype=torch.bool, device=blocks.device)
    m.scatter_(3, torch.where(blocks < 0, nb, blocks).long(), True)
    return m[..., :nb]


def reference_with_blocks(q, k, v, block_mask, scale=None):
    """fp32 prefill over a given (B, Hkv, nbq, nbk) block mask, token-causal with the
    queries bottom-right aligned, block by block."""
    B, Hq, T, D = q.shape
    off = k.shape[2] - T
    outs, lses = [], []
    for i in range(-(-T // 64)):
        hi = min(i * 64 + 64, T)
        qp = off + torch.arange(i * 64, hi, device=DEV).view(-1, 1)
        kp = torch.arange(off + hi, device=DEV).view(1, -1)
        mask = (kp <= qp).view(1, 1, hi - i * 64, off + hi) & block_mask[:, :, i, kp.view(-1) // 64].unsqueeze(2)
        o, lse = ref.attention_with_mask(q[:, :, i * 64:hi], k[:, :, :off + hi], v[:, :, :off + hi], mask,
                                         scale=scale, return_lse=True)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def check_blocks(blocks, q, k, pol):
    """Kernel block lists == reference block mask, except swaps within relative 1e-3 of the
    k-th score (the kernel folds the GQA sum as qpos . kmax + qneg . kmin)."""
    T = q.shape[2]
    nb = -(-k.shape[2] // 64)
    want = ref.prefill_block_mask(q, k, policy=pol)
    got = blocks_to_mask(blocks, nb)
    valid = blocks[blocks >= 0]
    assert ((blocks[..., 1:] > blocks[..., :-1]) | (blocks[..., 1:] < 0)).all(), "lists must ascend, -1 last"
    assert valid.numel() and int(valid.max()) < nb
    diff = got ^ want
    if not diff.any():
        return
    # near-ties only: recompute the scores of the differing rows
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    summ = ref.page_summaries(k, page_size=64)
    for b, h, i in diff.any(-1).nonzero().tolist():
        rows = slice(i * 64, min(i * 64 + 64, T))
        qm = q[b, h * G:(h + 1) * G, rows].float().mean(1)  # (G, D)
        s = ref._quest_bound(qm.view(1, 1, G, D), summ[b:b + 1, h:h + 1])[0, 0]
        chosen = want[b, h, i].nonzero().view(-1)
        thr = s[chosen].min().item()
        for j in diff[b, h, i].nonzero().view(-1).tolist():
            assert abs(s[j].item() - thr) <= 1e-3 * max(abs(thr), 1e-6), \
                f"(b={b}, h={h}, block {i}) key block {j} score {s[j].item()} is not a near-tie of {thr}"


@pytest.mark.kernels_ci
@pytest.mark.parametrize("T", [64, 192, 4096, 4160, 8191])
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (32, 8), (16, 2), (6, 2)])
def test_prefill_parity(T, Hq, Hkv):
    _need_ops()
    q, k, v = make(1 if T > 4096 else 2, Hq, Hkv, T, seed=T + 7 * Hq)
    out = torch.full_like(q, float("nan"))
    o, lse = hydra.hydra(q, k, v, policy=POL, out=out, return_lse=True)
    assert o is out and not torch.isnan(o).any()
    nb = -(-T // 64)
    if T > POL.budget_tokens:
        blocks = kernel_blocks(q, k, POL)
        check_blocks(blocks, q, k, POL)
        mask = blocks_to_mask(blocks, nb)
    else:
        mask = torch.ones(q.shape[0], Hkv, nb, nb, dtype=torch.bool, device=DEV)
    o_ref, lse_ref = reference_with_blocks(q, k, v, mask)
    assert rel_err(o, o_ref) < 1e-2
    assert torch.allclose(lse, lse_ref, atol=2e-2, rtol=1e-3)
    if T <= POL.budget_tokens:  # under the budget the reference itself is exact causal attention
        assert rel_err(o, ref.hydra(q, k, v, policy=POL)) < 1e-2


@pytest.mark.kernels_ci
@pytest.mark.parametrize("T", [64, 192, 4160, 8191])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_prefill_matches_sdpa(T, dtype):
    _need_ops()
    q, k, v = make(2, 16, 4, T, seed=T, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    o = hydra.hydra(q, k, v, precision="exact", out=out)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                            enable_gqa=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err, err_sdpa = rel_err(o, want), rel_err(sdpa, want)
    assert err <= 2 * err_sdpa + 1e-4, f"hydra {err:.2e} vs SDPA {err_sdpa:.2e} against fp32"


@pytest.mark.kernels_ci
def test_prefill_head_dim_64_fp16_and_dense_layers():
    _need_ops()
    q, k, v = make(1, 8, 2, 3000, D=64, seed=3, dtype=torch.float16)
    o = hydra.hydra(q, k, v, policy=POL, out=torch.full_like(q, float("nan")))
    mask = blocks_to_mask(kernel_blocks(q, k, POL), -(-3000 // 64))
    assert rel_err(o, reference_with_blocks(q, k, v, mask)[0]) < 1e-2
    dense = hydra.hydra(q, k, v, policy=POL, policy_layer_idx=0)  # dense_layers=0: still selects
    assert torch.equal(dense, o)
    exact = hydra.hydra(q, k, v, policy=hydra.HydraPolicy(budget_tokens=1024, sink_tokens=64, recent_tokens=192),
                        policy_layer_idx=1)  # dense layer (dense_layers=2): causal attention
    full = torch.ones(1, 2, 47, 47, dtype=torch.bool, device=DEV)
    assert rel_err(exact, reference_with_blocks(q, k, v, full)[0]) < 1e-2


@pytest.mark.parametrize("W", [1, 100, 1000])
def test_sliding_window_prefill(W):
    _need_ops()
    q, k, v = make(1, 8, 2, 2500, seed=W)
    o = hydra.hydra(q, k, v, sliding_window=W, out=torch.full_like(q, float("nan")))
    want = ref.hydra(q, k, v, sliding_window=W)
    assert rel_err(o, want) < 1e-2


def test_prefill_memory_is_linear_in_T():
    """T = 131,072 with the "high" preset: beyond q/k/v, the call allocates the output,
    the LSE, the block summaries and the block lists, O(T), and never a T x T tensor."""
    _need_ops()
    T = 131072
    q, k, v = make(1, 32, 8, T, seed=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = hydra.hydra(q, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_bytes = o.numel() * o.element_size()
    lse_bytes = 32 * T * 4
    meta = 8 * (T // 64) * (2 * 128 * 2 + 64 * 4)  # summaries + block lists
    assert extra <= out_bytes + lse_bytes + meta + (8 << 20), f"{extra} bytes allocated"
    assert torch.isfinite(o).all()


@pytest.mark.kernels_ci
@pytest.mark.parametrize("Tq,Tkv", [(2, 4160), (100, 4160), (1000, 5000), (640, 8191), (3000, 3100)])
def test_chunked_prefill(Tq, Tkv):
    """1 < Tq < Tkv: queries are the last Tq positions (chunked prefill, speculative
    verification); selection and attention against the reference, and the exact mode
    against SDPA with a bottom-right causal mask."""
    _need_ops()
    q, k, v = make(1, 16, 4, Tkv, seed=Tq + Tkv, Tq=Tq)
    out = torch.full_like(q, float("nan"))
    o, lse = hydra.hydra(q, k, v, policy=POL, out=out, return_lse=True)
    assert not torch.isnan(o).any()
    blocks = kernel_blocks(q, k, POL)
    check_blocks(blocks, q, k, POL)
    o_ref, lse_ref = reference_with_blocks(q, k, v, blocks_to_mask(blocks, -(-Tkv // 64)))
    assert rel_err(o, o_ref) < 1e-2
    assert torch.allclose(lse, lse_ref, atol=2e-2, rtol=1e-3)
    exact = hydra.hydra(q, k, v, precision="exact", out=torch.full_like(q, float("nan")))
    allowed = torch.arange(Tkv, device=DEV).view(1, -1) <= (Tkv - Tq + torch.arange(Tq, device=DEV)).view(-1, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed,
                                                            enable_gqa=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    assert rel_err(exact, want) <= 2 * rel_err(sdpa, want) + 1e-4


@pytest.mark.kernels_ci
def test_prefill_opcheck_and_compile():
    _need_ops()
    from hydra import ops

    q, k, v = make(1, 8, 2, 1500, seed=5)
    out = torch.empty_like(q)
    lse = torch.empty(1, 8, 1500, dtype=torch.float32, device=DEV)
    torch.library.opcheck(ops.prefill.default, (q, k, v, 64, 192, 1024, 0, 0.088, out, lse))
    blocks = torch.empty(1, 2, 24, 16, dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.prefill_blocks.default, (q, k, 64, 192, 1024, blocks))
    f = lambda q_, k_, v_: hydra.hydra(q_, k_, v_, policy=POL)  # noqa: E731
    assert torch.equal(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("T", [192, 4160])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_head_dim_256(T, dtype):
    """D = 256 with few KV heads (16 query heads over 2, the Gemma / Qwen3-Next shape):
    selection and attention against the reference, exact mode against SDPA."""
    _need_ops()
    q, k, v = make(1, 16, 2, T, D=256, seed=T, dtype=dtype)
    o = hydra.hydra(q, k, v, policy=POL, out=torch.full_like(q, float("nan")))
    nb = -(-T // 64)
    if T > POL.budget_tokens:
        blocks = kernel_blocks(q, k, POL)
        check_blocks(blocks, q, k, POL)
        mask = blocks_to_mask(blocks, nb)
    else:
        mask = torch.ones(1, 2, nb, nb, dtype=torch.bool, device=DEV)
    assert rel_err(o, reference_with_blocks(q, k, v, mask)[0]) < 1e-2
    exact = hydra.hydra(q, k, v, precision="exact")
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                            enable_gqa=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(exact, want) <= 2 * rel_err(sdpa, want) + 1e-4
