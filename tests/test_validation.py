"""Every SPEC section 3 input error: the exception type and a message that names the
argument and shows the received value. Structural checks run before the device
check, so all but the device cases run on a CPU-only machine."""

from __future__ import annotations

import re

import pytest
import torch

import hydra
from conftest import HAS_CUDA

BF16 = torch.bfloat16


def qkv(B=2, Hq=8, Hkv=2, Tq=1, Tkv=100, D=128, dtype=BF16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Hkv, Tkv, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Hkv, Tkv, D, generator=g).to(dtype).to(device)
    return q, k, v


def raises(exc, pattern):
    return pytest.raises(exc, match=re.escape(pattern))


def test_cpu_tensors_rejected():
    q, k, v = qkv()
    with raises(ValueError, "hydra: q must be a CUDA tensor, got device cpu"):
        hydra.hydra(q, k, v)


def test_not_a_tensor():
    q, k, v = qkv()
    with raises(TypeError, "hydra: k must be a torch.Tensor, got list"):
        hydra.hydra(q, [1, 2], v)


def test_dtype_mismatch_names_tensor_and_dtype():
    q, k, v = qkv()
    with raises(TypeError, "hydra: k must be torch.bfloat16 like q, got torch.float32"):
        hydra.hydra(q, k.float(), v)
    with raises(TypeError, "hydra: v must be torch.bfloat16 like q, got torch.float16"):
        hydra.hydra(q, k, v.half())
    with raises(TypeError, "hydra: k must be torch.float16 like q, got torch.bfloat16"):
        hydra.hydra(q.half(), k, v.half())
    with raises(TypeError, "hydra: q must be bf16 or fp16, got torch.float32"):
        hydra.hydra(q.float(), k.float(), v.float())


def test_unsupported_head_dim():
    q, k, v = qkv(D=96)
    with raises(ValueError, "hydra: head dim D must be one of (64, 128, 256), got D=96"):
        hydra.hydra(q, k, v)


def test_gqa_divisibility():
    q, k, v = qkv(Hq=6, Hkv=4)
    with raises(ValueError, "hydra: Hq must be a multiple of Hkv, got Hq=6, Hkv=4"):
        hydra.hydra(q, k, v)


def test_group_too_large():
    q, k, v = qkv(Hq=64, Hkv=2)
    with raises(ValueError, "hydra: GQA group Hq/Hkv must be <= 16 (larger groups are planned), got Hq=64, Hkv=2"):
        hydra.hydra(q, k, v)


def test_mismatched_batch_dim_and_length():
    q, k, v = qkv()
    k3 = torch.randn(3, 2, 100, 128).to(BF16)
    with raises(ValueError, "hydra: k batch size must match q's (2), got k.shape=(3, 2, 100, 128)"):
        hydra.hydra(q, k3, v)
    k64 = torch.randn(2, 2, 100, 64).to(BF16)
    with raises(ValueError, "hydra: k head dim must match q's (128), got k.shape=(2, 2, 100, 64)"):
        hydra.hydra(q, k64, v)
    with raises(ValueError, "hydra: v must have k's shape (2, 2, 100, 128) (same Hkv and Tkv), got (2, 2, 99, 128)"):
        hydra.hydra(q, k, v[:, :, :99])


def test_rank():
    q, k, v = qkv()
    with raises(ValueError, "hydra: q must be 4-D (B, Hq, Tq, D), got shape (2, 8, 128)"):
        hydra.hydra(q[:, :, 0], k, v)


def test_is_causal_false():
    q, k, v = qkv()
    with raises(ValueError, "hydra: is_causal must be True (hydra is causal attention), got False"):
        hydra.hydra(q, k, v, is_causal=False)


def test_unknown_precision_lists_valid_ones():
    q, k, v = qkv()
    with raises(ValueError, "hydra: precision must be one of ['balanced', 'exact', 'fast', 'high'], got 'ultra'"):
        hydra.hydra(q, k, v, precision="ultra")


def test_unsupported_tq():
    q, k, v = qkv(Tq=0)
    with raises(ValueError, "hydra: q must hold at least one query (Tq >= 1), got Tq=0"):
        hydra.hydra(q, k, v)
    q, k, v = qkv(Tq=200, Tkv=100)
    with raises(ValueError, "got Tq=200 > Tkv=100"):
        hydra.hydra(q, k, v)


def test_prefill_block_size():
    q, k, v = qkv(Tq=100, Tkv=100)
    with raises(ValueError, "hydra: the prefill kernel uses blocks of 64 tokens; set HydraPolicy(block_size=64), "
                            "got block_size=32"):
        hydra.hydra(q, k, v, policy=hydra.HydraPolicy(block_size=32))



def test_cache_seqlens_dtype_and_shape():
    q, k, v = qkv()
    with raises(TypeError, "hydra: cache_seqlens must be int32, got torch.int64"):
        hydra.hydra(q, k, v, cache_seqlens=torch.tensor([5, 6]))
    with raises(ValueError, "hydra: cache_seqlens must have shape (2,), got (3,)"):
        hydra.hydra(q, k, v, cache_seqlens=torch.tensor([5, 6, 7], dtype=torch.int32))
    with raises(TypeError, "hydra: cache_seqlens must be a torch.Tensor, got list"):
        hydra.hydra(q, k, v, cache_seqlens=[5, 6])


def test_cache_leftpad_dtype_shape_and_path():
    q, k, v = qkv()
    with raises(TypeError, "hydra: cache_leftpad must be int32, got torch.int64"):
        hydra.hydra(q, k, v, cache_leftpad=torch.tensor([5, 6]))
    with raises(ValueError, "hydra: cache_leftpad must have shape (2,), got (1,)"):
        hydra.select_pages(q, k, cache_leftpad=torch.tensor([5], dtype=torch.int32))
    with raises(TypeError, "hydra: cache_leftpad must be a torch.Tensor, got list"):
        hydra.page_summaries(k, cache_leftpad=[5, 6])
    qp, kp, vp = qkv(Tq=128, Tkv=128)
    with raises(ValueError, "hydra: cache_leftpad is a decode argument; prefill (Tq=128) got one"):
        hydra.hydra(qp, kp, vp, cache_leftpad=torch.zeros(2, dtype=torch.int32))


def test_page_summaries_shape_must_fit_k_and_policy():
    q, k, v = qkv(Tkv=100)
    bad = torch.zeros(2, 2, 6, 2, 128, dtype=BF16)  # 100 tokens / 16 -> 7 pages
    with raises(ValueError, "hydra: page_summaries must have shape (2, 2, 7, 2, 128) for k (2, 2, 100, 128) "
                            "and page_size=16, got (2, 2, 6, 2, 128)"):
        hydra.hydra(q, k, v, page_summaries=bad)
    eight = torch.zeros(2, 2, 7, 2, 128, dtype=BF16)
    with raises(ValueError, "page_size=8, got (2, 2, 7, 2, 128)"):
        hydra.hydra(q, k, v, page_summaries=eight, policy=hydra.HydraPolicy(page_size=8))
    with raises(TypeError, "hydra: page_summaries must be torch.bfloat16 like k, or torch.float8_e4m3fn, got "
                           "torch.float32"):
        hydra.hydra(q, k, v, page_summaries=eight.float())


@pytest.mark.parametrize("w", [0, -5, 2.5, True, "64"])
def test_unsupported_sliding_window(w):
    q, k, v = qkv()
    with raises(ValueError, f"hydra: sliding_window must be None or a positive int, got {w!r}"):
        hydra.hydra(q, k, v, sliding_window=w)


def test_policy_layer_idx_and_scale_and_out():
    q, k, v = qkv()
    with raises(ValueError, "hydra: policy_layer_idx must be >= 0, got -1"):
        hydra.hydra(q, k, v, policy_layer_idx=-1)
    with raises(ValueError, "hydra: scale must be a finite positive number, got nan"):
        hydra.hydra(q, k, v, scale=float("nan"))
    with raises(ValueError, "hydra: out must have q's shape (2, 8, 1, 128), got (2, 8, 1, 64)"):
        hydra.hydra(q, k, v, out=torch.empty(2, 8, 1, 64, dtype=BF16))
    padded = torch.empty(2, 8, 1, 132, dtype=BF16)[..., :128]  # rows 264 bytes apart
    with raises(ValueError, "hydra: out strides must be multiples of 8 elements (16 bytes), "
                            "got strides (1056, 132, 132, 1)"):
        hydra.hydra(q, k, v, out=padded)


def test_strides():
    q, k, v = qkv()
    kt = torch.randn(2, 2, 128, 100).to(BF16).transpose(2, 3)
    with raises(ValueError, "hydra: k must have a contiguous last dimension, got strides (25600, 12800, 1, 100)"):
        hydra.hydra(q, kt, v)


def test_policy_fields():
    with raises(ValueError, "hydra: HydraPolicy.page_size must be a power of two in [8, 64], got 12"):
        hydra.HydraPolicy(page_size=12)
    with raises(ValueError, "hydra: HydraPolicy.budget_tokens must be a positive multiple of page_size (16), got 1000"):
        hydra.HydraPolicy(budget_tokens=1000)
    with raises(ValueError, "hydra: HydraPolicy.scorer must be one of ('quest_sum',), got 'max'"):
        hydra.HydraPolicy(scorer="max")
    with raises(ValueError, "leaves no room for scored pages"):
        hydra.HydraPolicy(budget_tokens=512, recent_tokens=512)
    with raises(ValueError, "hydra: HydraPolicy.summary_dtype must be one of ('auto', 'fp8_e4m3'), got 'int8'"):
        hydra.HydraPolicy(summary_dtype="int8")
    with raises(ValueError, "hydra: HydraPolicy.summary_scale must be a power of two in [2^-16, 2^16], got 0.3"):
        hydra.HydraPolicy(summary_scale=0.3)


def test_e4m3_summary_arguments():
    q, k, v = qkv()
    with raises(TypeError, "hydra: page_summaries dtype must be None, k's dtype (torch.bfloat16) or "
                           "torch.float8_e4m3fn, got torch.float16"):
        hydra.page_summaries(k, dtype=torch.float16)
    with raises(ValueError, "hydra: page_summaries scale must be a power of two in [2^-16, 2^16], got 3.0"):
        hydra.page_summaries(k, dtype=torch.float8_e4m3fn, scale=3.0)
    pol = hydra.HydraPolicy(superpage=4)
    summ = torch.zeros(2, 2, 7, 2, 128, dtype=torch.float8_e4m3fn)
    with raises(TypeError, "hydra: superpage_summaries must be torch.float8_e4m3fn like page_summaries, got "
                           "torch.bfloat16"):
        hydra.hydra(q, k, v, policy=pol, page_summaries=summ,
                    superpage_summaries=torch.zeros(2, 2, 2, 2, 128, dtype=BF16))


def test_select_pages_and_summaries_and_sparse_attention_validate():
    q, k, v = qkv()
    with raises(ValueError, "hydra: select_pages does not apply to sliding-window layers (sliding_window=64)"):
        hydra.select_pages(q, k, sliding_window=64)
    with raises(ValueError, "hydra: page_size must be a power of two in [8, 64], got 48"):
        hydra.page_summaries(k, page_size=48)
    pages = torch.zeros(2, 2, 4, dtype=torch.int64)
    with raises(TypeError, "hydra: pages must be int32, got torch.int64"):
        hydra.sparse_attention(q, k, v, pages)
    with raises(ValueError, "hydra: pages must have shape (2, 2, n >= 1), got (2, 3, 4)"):
        hydra.sparse_attention(q, k, v, torch.zeros(2, 3, 4, dtype=torch.int32))


def test_prefill_takes_no_cache_arguments():
    q, k, v = qkv(Tq=3, Tkv=100)
    with raises(ValueError, "hydra: cache_seqlens is a decode argument; prefill (Tq=3) got one"):
        hydra.hydra(q, k, v, cache_seqlens=torch.full((2,), 50, dtype=torch.int32))


@pytest.mark.gpu
def test_mixed_devices_and_seqlens_values(monkeypatch):
    q, k, v = qkv(device="cuda")
    with raises(ValueError, "hydra: v must be on q's device cuda:0, got cpu"):
        hydra.hydra(q, k, v.cpu())
    with raises(ValueError, "hydra: cache_seqlens must be on q's device cuda:0, got cpu"):
        hydra.hydra(q, k, v, cache_seqlens=torch.tensor([5, 6], dtype=torch.int32))
    hydra.set_debug(True)
    try:
        with raises(ValueError, "hydra: cache_seqlens values must lie in [1, Tkv=100], got min=0, max=101"):
            hydra.hydra(q, k, v, cache_seqlens=torch.tensor([0, 101], dtype=torch.int32, device="cuda"))
    finally:
        hydra.set_debug(False)


@pytest.mark.gpu
def test_errors_raise_before_any_kernel(monkeypatch):
    class NoKernels:
        def __getattr__(self, name):
            raise AssertionError(f"kernel {name} launched before validation finished")

    monkeypatch.setattr(hydra, "ops", NoKernels())
    q, k, v = qkv(device="cuda")
    for kwargs in (dict(precision="x"), dict(sliding_window=0), dict(is_causal=False),
                   dict(cache_seqlens=torch.ones(2, dtype=torch.int64, device="cuda"))):
        with pytest.raises((ValueError, TypeError)):
            hydra.hydra(q, k, v, **kwargs)


def test_fast_scalars_gate():
    """The scalar gate of both fast paths (hydra._fast_scalars): None or the one type and
    range the checked path accepts; anything else goes to the checked path, which names
    the argument (a bool is not an int here, an int scale not a float)."""
    ok = hydra._fast_scalars
    for args in [(None, None, None), (1, 0, 0.5), (4096, 31, 1e-3), (None, 7, None), (333, None, 2.0)]:
        assert ok(*args), args
    nan, inf = float("nan"), float("inf")
    for args in [(0, None, None), (-5, None, None), (True, None, None), (1.0, None, None), ("64", None, None),
                 (None, -1, None), (None, True, None), (None, 1.5, None),
                 (None, None, 0.0), (None, None, -0.1), (None, None, inf), (None, None, nan), (None, None, 1),
                 (None, None, True), (None, None, torch.tensor(0.1))]:
        assert not ok(*args), args


@pytest.mark.gpu
def test_fast_path_accepts_only_well_formed_calls():
    from hydra._validate import _fast_decode_ok

    q, k, v = qkv(device="cuda")
    pol = hydra.HydraPolicy()
    summ = torch.zeros(2, 2, 7, 2, 128, dtype=BF16, device="cuda")
    lens = torch.tensor([50, 100], dtype=torch.int32, device="cuda")
    assert _fast_decode_ok(q, k, v, pol, lens, summ)
    assert not _fast_decode_ok(q, k, v, pol, lens, summ[:, :, :6])          # wrong page count
    assert not _fast_decode_ok(q, k, v, pol, lens.long(), summ)             # wrong dtype
    assert not _fast_decode_ok(q, k, v.cpu(), pol, lens, summ)              # mixed devices
    assert not _fast_decode_ok(q, k, v, hydra.HydraPolicy(page_size=8), lens, summ)  # policy's page size
    with raises(ValueError, "hydra: page_summaries must have shape (2, 2, 7, 2, 128)"):
        hydra.hydra(q, k, v, cache_seqlens=lens, page_summaries=summ[:, :, :6])


@pytest.mark.gpu
def test_fast_path_is_taken_and_matches_the_checked_path(monkeypatch):
    """The common call skips the Python checks (the op checks in C++) and gives the
    same output, bit for bit, as the same call through the checked path: the default
    call, scale, a dense and a selecting layer index, a policy object, a sliding window,
    left padding, and a given out."""
    if hydra.ops is None:
        pytest.fail("the CUDA extension did not build on a GPU machine")
    g = torch.Generator(device="cuda").manual_seed(1234)
    B, Hq, Hkv, T, D = 3, 12, 4, 9001, 128  # group 3, a ragged last page
    q = torch.randn(B, Hq, 1, D, device="cuda", generator=g).to(BF16)
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(BF16)
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(BF16)
    lens = torch.tensor([T, 6007, 4500], dtype=torch.int32, device="cuda")
    pad = torch.tensor([0, 1203, 17], dtype=torch.int32, device="cuda")
    summ = hydra.page_summaries(k, cache_seqlens=lens)
    summ_pad = hydra.page_summaries(k, cache_seqlens=lens, cache_leftpad=pad)
    # Coarse-to-fine over 8-token pages: 1,126 pages, 71 superpages of 16, a shortlist of 16.
    c2f = hydra.HydraPolicy(page_size=8, budget_tokens=1024, sink_tokens=64, recent_tokens=256, superpage=16,
                            shortlist=2)
    s8 = hydra.page_summaries(k, page_size=8, cache_seqlens=lens)
    s8_pad = hydra.page_summaries(k, page_size=8, cache_seqlens=lens, cache_leftpad=pad)
    levels = {"policy": c2f, "page_summaries": s8, "superpage_summaries": hydra.superpage_summaries(s8, 16)}
    variants = [{}, {"scale": 0.07}, {"policy_layer_idx": 0}, {"policy_layer_idx": 7},  # layer 0: dense
                {"policy": hydra.HydraPolicy(sink_tokens=32, recent_tokens=256), "precision": "balanced"},
                {"sliding_window": 1000}, {"sliding_window": 333, "policy_layer_idx": 0},
                {"cache_leftpad": pad, "page_summaries": summ_pad}, {"out": True}, {"out": True, "scale": 0.05},
                levels, {**levels, "out": True}, {**levels, "policy_layer_idx": 0}, {**levels, "sliding_window": 1000},
                {**levels, "cache_leftpad": pad, "page_summaries": s8_pad,
                 "superpage_summaries": hydra.superpage_summaries(s8_pad, 16)}]

    def call(kw):
        kw = {"cache_seqlens": lens, "page_summaries": summ, **kw}
        if kw.get("out"):
            kw["out"] = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        out, lse = hydra.hydra(q, k, v, return_lse=True, **kw)
        if "out" in kw:
            assert out is kw["out"], "out= was not written in place"
        return out, lse

    with monkeypatch.context() as m:  # the checked path: the fast path declines every call
        m.setattr(hydra, "_fast_decode", lambda *args, **kwargs: None)
        checked = [call(kw) for kw in variants]
        c2f_pages = hydra.select_pages(q, k, policy=c2f, cache_seqlens=lens, page_summaries=s8,
                                       superpage_summaries=levels["superpage_summaries"])

    def no_checks(*args, **kwargs):
        raise AssertionError("the fast path ran the Python checks")

    monkeypatch.setattr(hydra, "validate_decode_call", no_checks)
    for kw, (out_c, lse_c) in zip(variants, checked):
        fast, lse_fast = call(kw)
        assert torch.isfinite(fast).all() and torch.isfinite(out_c).all()
        assert torch.equal(fast, out_c) and torch.equal(lse_fast, lse_c), f"{kw}: the fast path differs"
    for i in (1, 2, 4, 5, 6, 7, 9):  # the variants change the output: each argument reached the op
        assert not torch.equal(checked[0][0], checked[i][0]), variants[i]
    assert not torch.equal(checked[5][0], checked[6][0])  # the window, not the dense layer, wins
    assert torch.equal(checked[0][0], checked[8][0])  # out= alone changes nothing
    # Coarse-to-fine: its own selection (not the flat one's, nor every token), out= alone
    # changes nothing, and a dense layer or a window ignores the superpages.
    assert not torch.equal(checked[10][0], checked[0][0]) and not torch.equal(checked[10][0], checked[2][0])
    assert torch.equal(checked[10][0], checked[11][0])
    for i, j in ((12, 2), (13, 5)):  # every token / the window, over pages of 8 instead of 16: same keys
        err = (checked[i][0].float() - checked[j][0].float()).abs().max() / checked[j][0].float().abs().max()
        assert err < 1e-2, f"{variants[i]}: relative difference {err:.3g} from {variants[j]}"
    assert not torch.equal(checked[14][0], checked[10][0])
    want = hydra.reference.sparse_attention(q, k, v, c2f_pages, page_size=8, cache_seqlens=lens).float()
    err = (checked[10][0].float() - want).abs().max() / want.abs().max()
    assert err < 2e-2, f"coarse-to-fine: relative error {err:.3g} against the reference over its pages"
    # The windows against the fp32 reference (no selection, so no near-tie swaps; left
    # padding is compared with it in test_gpu.py, through this path now).
    for i in (5, 6):
        want = hydra.reference.hydra(q, k, v, cache_seqlens=lens, **variants[i]).float()
        err = (checked[i][0].float() - want).abs().max() / want.abs().max()
        assert err < 2e-2, f"{variants[i]}: relative error {err:.3g} against the reference"
    for precision in ("balanced", "fast"):
        assert torch.isfinite(hydra.hydra(q, k, v, precision=precision, cache_seqlens=lens,
                                          page_summaries=hydra.page_summaries(k, cache_seqlens=lens))).all()


@pytest.mark.gpu
def test_fast_path_refusals_raise_the_named_error_before_any_kernel():
    """Bad input on the fast path: the op refuses it in C++ before launching anything,
    and the full checks then raise the error that names the argument."""
    from torch.profiler import ProfilerActivity, profile

    if hydra.ops is None:
        pytest.fail("the CUDA extension did not build on a GPU machine")
    q, k, v = qkv(device="cuda")  # B=2, Hq=8, Hkv=2, Tkv=100, D=128
    lens = torch.tensor([50, 100], dtype=torch.int32, device="cuda")
    summ = hydra.page_summaries(k, cache_seqlens=lens)
    summ8 = hydra.page_summaries(k, page_size=8, cache_seqlens=lens)
    wide = torch.randn(2, 2, 100, 130, device="cuda").to(BF16)[..., :128]  # rows 130 elements apart
    q34, k34, v34 = qkv(Hq=34, Hkv=2, device="cuda")
    q96, k96, v96 = qkv(D=96, device="cuda")
    # Every bad argument is made here, outside the profiled calls (a cast is a kernel).
    k16, lens64, summf = k.half(), lens.long(), summ.float()
    v_cpu, lens_cpu, summ_cpu = v.cpu(), lens.cpu(), summ.cpu()
    out16, out_cpu, out_short = torch.empty_like(q).half(), torch.empty_like(q).cpu(), torch.empty_like(q[:, :4])
    # Coarse-to-fine over 8-token pages: 13 pages, 4 superpages of 4.
    c2f = hydra.HydraPolicy(page_size=8, budget_tokens=64, sink_tokens=8, recent_tokens=16, superpage=4, shortlist=1)
    ss = hydra.superpage_summaries(summ8, 4)
    ss2, ss16, ss_cpu = hydra.superpage_summaries(summ8, 2), ss.half(), ss.cpu()

    def profiled(fn):
        """(names of the CUDA kernels fn ran, the exception it raised or None)."""
        torch.cuda.synchronize()
        err = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (checked by the caller)
                err = e
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA], err

    ran, err = profiled(lambda: hydra.hydra(q, k, v, cache_seqlens=lens, page_summaries=summ))
    assert err is None
    if not ran:
        pytest.skip("the profiler records no CUDA kernels on this machine")
    cases = [
        (lambda: hydra.hydra(q, k16, v, page_summaries=summ), TypeError,
         "hydra: k must be torch.bfloat16 like q, got torch.float16"),
        (lambda: hydra.hydra(q, k, v, cache_seqlens=lens64), TypeError,
         "hydra: cache_seqlens must be int32, got torch.int64"),
        (lambda: hydra.hydra(q, k, v, cache_seqlens=lens[:1]), ValueError,
         "hydra: cache_seqlens must have shape (2,), got (1,)"),
        (lambda: hydra.hydra(q, k, v, page_summaries=summ8), ValueError,
         "hydra: page_summaries must have shape (2, 2, 7, 2, 128)"),
        (lambda: hydra.hydra(q, k, v, page_summaries=summ[:1]), ValueError,
         "hydra: page_summaries must have shape (2, 2, 7, 2, 128)"),
        (lambda: hydra.hydra(q, k, v, page_summaries=summf), TypeError,
         "hydra: page_summaries must be torch.bfloat16 like k, or torch.float8_e4m3fn, got torch.float32"),
        (lambda: hydra.hydra(q96, k96, v96), ValueError, "hydra: head dim D must be one of (64, 128, 256), got D=96"),
        (lambda: hydra.hydra(q34, k34, v34), ValueError, "hydra: GQA group Hq/Hkv must be <= 16"),
        (lambda: hydra.hydra(q, wide, v), ValueError, "hydra: k strides must be multiples of 8 elements (16 bytes)"),
        (lambda: hydra.hydra(q, k, v_cpu), ValueError, "hydra: v must be on q's device cuda:0, got cpu"),
        (lambda: hydra.hydra(q, k, v, cache_seqlens=lens_cpu), ValueError,
         "hydra: cache_seqlens must be on q's device cuda:0, got cpu"),
        (lambda: hydra.hydra(q, k, v, page_summaries=summ_cpu), ValueError,
         "hydra: page_summaries must be on q's device cuda:0, got cpu"),
        (lambda: hydra.hydra(q[:, :, 0], k, v), ValueError, "hydra: q must be 4-D (B, Hq, Tq, D)"),
        (lambda: hydra.hydra(q, [1, 2], v), TypeError, "hydra: k must be a torch.Tensor, got list"),
        (lambda: hydra.hydra(q, k, v, scale=-1.0), ValueError,
         "hydra: scale must be a finite positive number, got -1.0"),
        (lambda: hydra.hydra(q, k, v, policy_layer_idx=-1), ValueError,
         "hydra: policy_layer_idx must be >= 0, got -1"),
        (lambda: hydra.hydra(q, k, v, sliding_window=0), ValueError,
         "hydra: sliding_window must be None or a positive int, got 0"),
        (lambda: hydra.hydra(q, k, v, sliding_window=True), ValueError,
         "hydra: sliding_window must be None or a positive int, got True"),
        (lambda: hydra.hydra(q, k, v, cache_seqlens=lens, cache_leftpad=lens64), TypeError,
         "hydra: cache_leftpad must be int32, got torch.int64"),
        (lambda: hydra.hydra(q, k, v, cache_seqlens=lens, cache_leftpad=lens_cpu), ValueError,
         "hydra: cache_leftpad must be on q's device cuda:0, got cpu"),
        (lambda: hydra.hydra(q, k, v, cache_leftpad=lens[:1]), ValueError,
         "hydra: cache_leftpad must have shape (2,), got (1,)"),
        (lambda: hydra.hydra(q, k, v, out=out16), TypeError, "hydra: out must be torch.bfloat16 like q, got torch.float16"),
        (lambda: hydra.hydra(q, k, v, out=out_short), ValueError, "hydra: out must have q's shape (2, 8, 1, 128)"),
        (lambda: hydra.hydra(q, k, v, out=out_cpu), ValueError, "hydra: out must be on q's device cuda:0, got cpu"),
        (lambda: hydra.hydra(q, k, v, sliding_window=16, out=out16), TypeError,
         "hydra: out must be torch.bfloat16 like q, got torch.float16"),
        (lambda: hydra.hydra(q, k, v, policy=c2f, page_summaries=summ8, superpage_summaries=ss2), ValueError,
         "hydra: superpage_summaries must have shape (2, 2, 4, 2, 128)"),
        (lambda: hydra.hydra(q, k, v, policy=c2f, page_summaries=summ8, superpage_summaries=ss16), TypeError,
         "hydra: superpage_summaries must be torch.bfloat16 like page_summaries, got torch.float16"),
        (lambda: hydra.hydra(q, k, v, policy=c2f, page_summaries=summ8, superpage_summaries=ss_cpu), ValueError,
         "hydra: superpage_summaries must be on q's device cuda:0, got cpu"),
        (lambda: hydra.hydra(q, k, v, policy=c2f, page_summaries=summ8, superpage_summaries=ss_cpu,
                             sliding_window=16), ValueError,
         "hydra: superpage_summaries must be on q's device cuda:0, got cpu"),
        (lambda: hydra.hydra(q, k, v, page_summaries=summ, superpage_summaries=ss), ValueError,
         "hydra: superpage_summaries given, but the policy selects flat"),
    ]
    for fn, exc, message in cases:
        ran, err = profiled(fn)
        assert type(err) is exc and message in str(err), f"wanted {exc.__name__}({message!r}), got {err!r}"
        assert not ran, f"{message!r}: kernels ran before the error: {ran}"


@pytest.mark.gpu
def test_direct_op_refusals_raise_with_the_values():
    """The ops' own checks (what the fast path relies on) raise RuntimeError with the
    values in the message; they never crash the process (NOTES.md v29: streaming numbers
    through std::ostream crashed a JIT build whose .so carries its own libstdc++)."""
    if hydra.ops is None:
        pytest.fail("the CUDA extension did not build on a GPU machine")
    ops = hydra.ops
    q, k, v = qkv(device="cuda")  # B=2, Hq=8, Hkv=2, Tkv=100, D=128
    lens = torch.tensor([50, 100], dtype=torch.int32, device="cuda")
    lens64, lens_cpu = lens.long(), lens.cpu()
    wide = torch.randn(2, 2, 100, 130, device="cuda").to(BF16)[..., :128]
    q34, k34, v34 = qkv(Hq=34, Hkv=2, device="cuda")
    q96, k96, v96 = qkv(D=96, device="cuda")
    e4m3 = torch.empty(2, 2, 7, 2, 128, dtype=torch.float8_e4m3fn, device="cuda")
    summ1 = hydra.page_summaries(k)[:1]
    ints = (0, 0, 64, 512, 4096, 0)  # superpage, shortlist, sink, recent, budget, window
    summ8 = hydra.page_summaries(k, page_size=8)
    ss1 = hydra.superpage_summaries(summ8, 4)[:1]
    cases = [
        # Tkv = 100 <= budget: the step attends every token, and still checks the summaries.
        (lambda: ops.decode_alloc(q, k, v, None, summ1, None, None, None, 16, *ints, 0.088),
         "hydra: page_summaries must be (2, 2, >=7, 2, 128) with a contiguous (2, D) block, got [1, 2, 7, 2, 128]"),
        (lambda: ops.decode_alloc(q, k, v, None, summ8, ss1, None, None, 8, 4, 1, *ints[2:], 0.088),
         "hydra: superpage_summaries must be (2, 2, >=4, 2, 128) with a contiguous (2, D) block, got "
         "[1, 2, 4, 2, 128]"),
        (lambda: ops.decode_alloc(q, k, v, None, None, None, lens64, None, 16, *ints, 0.088),
         "hydra: cache_seqlens must be a contiguous int32 CUDA tensor of shape (2,), got Long [2]"),
        (lambda: ops.decode_alloc(q, k, v, None, None, None, None, None, 12, *ints, 0.088),
         "hydra: page_size must be a power of two in [1, 64], got 12"),
        (lambda: ops.decode_alloc(q34, k34, v34, None, None, None, None, None, 16, *ints, 0.088),
         "hydra: GQA group Hq/Hkv must be <= 16, got Hq=34, Hkv=2"),
        (lambda: ops.decode_alloc(q96, k96, v96, None, None, None, None, None, 16, *ints, 0.088),
         "hydra: head dim D must be 64, 128 or 256, got D=96"),
        (lambda: ops.decode_alloc(q, wide, v, None, None, None, None, None, 16, *ints, 0.088),
         "hydra: k strides must be multiples of 8 elements (16 bytes), got strides [26000, 13000, 130, 1]"),
        (lambda: ops.page_summaries(k, None, None, 16, 3.0, e4m3),
         "hydra: summary_scale must be a power of two in [2^-16, 2^16], got 3"),
        (lambda: ops.page_summaries(k, lens_cpu, None, 16, 1.0, e4m3),
         "hydra: cache_seqlens must be a contiguous int32 CUDA tensor of shape (2,), got Int [2]"),
    ]
    for fn, message in cases:
        with raises(RuntimeError, message):
            fn()


def test_resolved_policies_are_reused_and_bad_ones_still_refused():
    """hydra resolves a (precision, policy) pair once; equal policies find it again, and
    a bad precision or policy still raises its named error (it is never cached)."""
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=1024)
    first = hydra._policy("fast", pol)
    assert first == hydra.policy.resolve_policy("fast", pol)
    assert hydra._policy("fast", hydra.HydraPolicy(page_size=8, budget_tokens=1024)) is first
    assert hydra._policy("high", pol) is not first and hydra._policy("high", pol).budget_tokens == 1024
    with raises(ValueError, "hydra: precision must be one of"):
        hydra._policy("medium", pol)
    with raises(ValueError, "hydra: precision must be one of"):
        hydra._policy(["high"], pol)  # unhashable: resolved, not cached
    with raises(TypeError, "hydra: policy must be a hydra.HydraPolicy or None, got dict"):
        hydra._policy("high", {"page_size": 8})
