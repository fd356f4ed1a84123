"""Argument checks, run before any kernel. Messages name the argument and show the value.

Structural checks (types, ranks, shapes, dtypes, strides) come before the device
check, so every message except the device one can be exercised on a CPU-only
machine. Nothing here reads a device tensor's values: those checks
(``check_*_values``) sync the host and run only in debug mode.
"""

from __future__ import annotations

import math

import torch

from .policy import check_summary_scale

SUPPORTED_HEAD_DIMS = (64, 128, 256)
PREFILL_HEAD_DIMS = (64, 128, 256)
_INV_SQRT_D = {d: 1.0 / math.sqrt(d) for d in SUPPORTED_HEAD_DIMS}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_GROUP = 16
_ALIGN = 8  # elements: 16-byte vector loads need every row to start 16-byte aligned


def _tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hydra: {name} must be a torch.Tensor, got {type(x).__name__}")


def _int_arg(x, name, minimum):
    if not isinstance(x, int) or isinstance(x, bool):
        raise TypeError(f"hydra: {name} must be an int, got {x!r}")
    if x < minimum:
        raise ValueError(f"hydra: {name} must be >= {minimum}, got {x}")


def _qkv(q, k, v):
    """Ranks, dtypes, head dims, GQA group, matching B/D/Tkv and strides of q, k, v."""
    _tensor(q, "q")
    _tensor(k, "k")
    if v is not None:
        _tensor(v, "v")
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if t.dim() != 4:
            layout = "(B, Hq, Tq, D)" if name == "q" else "(B, Hkv, Tkv, D)"
            raise ValueError(f"hydra: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hydra: q must be bf16 or fp16, got {q.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"hydra: {name} must be {q.dtype} like q, got {t.dtype}")
    B, Hq, Tq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"hydra: head dim D must be one of {SUPPORTED_HEAD_DIMS}, got D={D}")
    for name, t in named[1:]:
        if t.shape[0] != B:
            raise ValueError(f"hydra: {name} batch size must match q's ({B}), got {name}.shape={tuple(t.shape)}")
        if t.shape[3] != D:
            raise ValueError(f"hydra: {name} head dim must match q's ({D}), got {name}.shape={tuple(t.shape)}")
    Hkv, Tkv = k.shape[1], k.shape[2]
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"hydra: v must have k's shape {tuple(k.shape)} (same Hkv and Tkv), "
                         f"got {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"hydra: Hq must be a multiple of Hkv, got Hq={Hq}, Hkv={Hkv}")
    if Hq // Hkv > MAX_GROUP:
        raise ValueError(f"hydra: GQA group Hq/Hkv must be <= {MAX_GROUP} (larger groups are planned), "
                         f"got Hq={Hq}, Hkv={Hkv}")
    if Tkv < 1:
        raise ValueError(f"hydra: k must hold at least one token, got Tkv={Tkv}")
    for name, t in named:
        if t.stride(-1) != 1:
            raise ValueError(f"hydra: {name} must have a contiguous last dimension, got strides {t.stride()}")
        if any(s % _ALIGN for s in t.stride()[:-1]):
            raise ValueError(f"hydra: {name} strides must be multiples of {_ALIGN} elements (16 bytes), "
                             f"got strides {t.stride()}")
    return B, Hq, Tq, D, Hkv, Tkv


def _devices(named):
    """All tensors on one CUDA device (checked last: see the module docstring)."""
    first_name, first = named[0]
    if first.device.type != "cuda":
        raise ValueError(f"hydra: {first_name} must be a CUDA tensor, got device {first.device}")
    for name, t in named[1:]:
        if t is not None and t.device != first.device:
            raise ValueError(f"hydra: {name} must be on {first_name}'s device {first.device}, got {t.device}")


def _scale(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"hydra: scale must be a finite positive number, got {scale!r}")
    return float(scale)


def _cache_seqlens(cache_seqlens, B, name="cache_seqlens"):
    if cache_seqlens is None:
        return
    _tensor(cache_seqlens, name)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"hydra: {name} must be int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"hydra: {name} must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    if not cache_seqlens.is_contiguous():
        raise ValueError(f"hydra: {name} must be contiguous, got strides {cache_seqlens.stride()}")


def _out(out, q):
    if out is None:
        return
    _tensor(out, "out")
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"hydra: out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if out.dtype != q.dtype:
        raise TypeError(f"hydra: out must be {q.dtype} like q, got {out.dtype}")
    if out.stride(-1) != 1:
        raise ValueError(f"hydra: out must have a contiguous last dimension, got strides {out.stride()}")
    if any(s % _ALIGN for s in out.stride()[:-1]):  # the kernels store 4-8 elements at once
        raise ValueError(f"hydra: out strides must be multiples of {_ALIGN} elements (16 bytes), "
                         f"got strides {out.stride()}")


def _fast_decode_ok(q, k, v, policy, cache_seqlens, page_summaries):
    """One flat expression for the common well-formed decode call; anything it does not
    recognise goes through the full checks below, which name the offending argument.
    It accepts a subset of what the full checks accept, so it never lets bad input by."""
    T = torch.Tensor
    if not (type(q) is T and type(k) is T and type(v) is T and q.dtype in SUPPORTED_DTYPES
            and k.dtype is q.dtype and v.dtype is q.dtype and q.is_cuda):
        return False
    qs, ks = q.shape, k.shape
    if not (len(qs) == 4 and len(ks) == 4 and qs[2] == 1 and qs[3] in _INV_SQRT_D and ks[3] == qs[3] and qs[0] == ks[0]
            and v.shape == ks and ks[1] > 0 and qs[1] % ks[1] == 0 and qs[1] // ks[1] <= MAX_GROUP and ks[2] >= 1
            and k.device == q.device and v.device == q.device):
        return False
    for t in (q, k, v):
        st = t.stride()
        if st[3] != 1 or st[0] % _ALIGN or st[1] % _ALIGN or st[2] % _ALIGN:
            return False
    if cache_seqlens is not None and not (
            type(cache_seqlens) is T and cache_seqlens.dtype is torch.int32 and cache_seqlens.dim() == 1
            and cache_seqlens.shape[0] == qs[0] and cache_seqlens.device == q.device
            and cache_seqlens.is_contiguous()):
        return False
    if page_summaries is not None:
        ps = page_summaries
        if not (type(ps) is T and (ps.dtype is q.dtype or ps.dtype is torch.float8_e4m3fn) and ps.device == q.device
                and ps.shape == (qs[0], ks[1], -(-ks[2] // policy.page_size), 2, qs[3])):
            return False
        st = ps.stride()
        if st[4] != 1 or st[3] != qs[3] or st[0] % _ALIGN or st[1] % _ALIGN or st[2] % _ALIGN:
            return False
    return True


def validate_decode_call(q, k, v, *, is_causal, sliding_window, policy_layer_idx, policy, cache_seqlens,
                         page_summaries, scale, out, superpage_summaries=None, cache_leftpad=None):
    """Checks for hydra.hydra / hydra.select_pages. Returns {"scale": float}."""
    if (v is not None and is_causal is True and sliding_window is None and policy_layer_idx is None
            and scale is None and out is None and superpage_summaries is None and not policy.coarse
            and cache_leftpad is None
            and _fast_decode_ok(q, k, v, policy, cache_seqlens, page_summaries)):
        return {"scale": _INV_SQRT_D[q.shape[3]]}
    if is_causal is not True:
        raise ValueError(f"hydra: is_causal must be True (hydra is causal attention), got {is_causal!r}")
    B, Hq, Tq, D, Hkv, Tkv = _qkv(q, k, v)
    if sliding_window is not None:
        if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1:
            raise ValueError(f"hydra: sliding_window must be None or a positive int, got {sliding_window!r}")
    if policy_layer_idx is not None:
        _int_arg(policy_layer_idx, "policy_layer_idx", 0)
    scale = _scale(scale, D)
    _cache_seqlens(cache_seqlens, B)
    _cache_seqlens(cache_leftpad, B, "cache_leftpad")
    if page_summaries is not None:
        _tensor(page_summaries, "page_summaries")
        n_pages = -(-Tkv // policy.page_size)
        want = (B, Hkv, n_pages, 2, D)
        if tuple(page_summaries.shape) != want:
            raise ValueError(f"hydra: page_summaries must have shape {want} for k {tuple(k.shape)} and "
                             f"page_size={policy.page_size}, got {tuple(page_summaries.shape)}")
        if page_summaries.dtype not in (k.dtype, torch.float8_e4m3fn):
            raise TypeError(f"hydra: page_summaries must be {k.dtype} like k, or torch.float8_e4m3fn, got "
                            f"{page_summaries.dtype}")
        if page_summaries.stride(-1) != 1 or page_summaries.stride(-2) != D or \
                any(s % _ALIGN for s in page_summaries.stride()[:-1]):
            raise ValueError(f"hydra: page_summaries needs a contiguous (2, D) block per page and 16-byte "
                             f"aligned strides, got strides {page_summaries.stride()}")
    if superpage_summaries is not None:
        _tensor(superpage_summaries, "superpage_summaries")
        if not policy.coarse:
            raise ValueError(f"hydra: superpage_summaries given, but the policy selects flat "
                             f"(superpage={policy.superpage}); set HydraPolicy(superpage=...) to use them")
        if page_summaries is None:
            raise ValueError("hydra: superpage_summaries need the page_summaries they were built from")
        n_pages = -(-Tkv // policy.page_size)
        want = (B, Hkv, -(-n_pages // policy.superpage), 2, D)
        if tuple(superpage_summaries.shape) != want:
            raise ValueError(f"hydra: superpage_summaries must have shape {want} for k {tuple(k.shape)}, "
                             f"page_size={policy.page_size} and superpage={policy.superpage}, got "
                             f"{tuple(superpage_summaries.shape)}")
        if superpage_summaries.dtype != page_summaries.dtype:
            raise TypeError(f"hydra: superpage_summaries must be {page_summaries.dtype} like page_summaries, got "
                            f"{superpage_summaries.dtype}")
        if superpage_summaries.stride(-1) != 1 or superpage_summaries.stride(-2) != D or \
                any(s % _ALIGN for s in superpage_summaries.stride()[:-1]):
            raise ValueError(f"hydra: superpage_summaries needs a contiguous (2, D) block per superpage and "
                             f"16-byte aligned strides, got strides {superpage_summaries.stride()}")
    _out(out, q)
    if Tq < 1:
        raise ValueError(f"hydra: q must hold at least one query (Tq >= 1), got Tq={Tq}")
    if Tq > Tkv:
        raise ValueError(f"hydra: Tq must be at most Tkv (queries are the last Tq positions), got Tq={Tq} > "
                         f"Tkv={Tkv}")
    if Tq > 1:
        if cache_seqlens is not None:
            raise ValueError(f"hydra: cache_seqlens is a decode argument; prefill (Tq={Tq}) got one")
        if cache_leftpad is not None:
            raise ValueError(f"hydra: cache_leftpad is a decode argument; prefill (Tq={Tq}) got one")
        if policy.block_size != 64:
            raise ValueError(f"hydra: the prefill kernel uses blocks of 64 tokens; set HydraPolicy(block_size=64), "
                             f"got block_size={policy.block_size}")
        if D not in PREFILL_HEAD_DIMS:
            raise ValueError(f"hydra: the prefill kernel takes head dim D in {PREFILL_HEAD_DIMS}, got D={D}")
        if not policy.exact and policy.budget_tokens % 64:
            raise ValueError(f"hydra: prefill needs budget_tokens to be a multiple of 64, got {policy.budget_tokens}")
    _devices([("q", q), ("k", k), ("v", v), ("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad),
              ("page_summaries", page_summaries), ("superpage_summaries", superpage_summaries), ("out", out)])
    return {"scale": scale}


def validate_sparse_attention_call(q, k, v, pages, *, page_size, cache_seqlens, scale, out, cache_leftpad=None):
    B, Hq, Tq, D, Hkv, Tkv = _qkv(q, k, v)
    if Tq != 1:
        raise ValueError(f"hydra: sparse_attention is decode attention (Tq == 1), got Tq={Tq}")
    _int_arg(page_size, "page_size", 1)
    if page_size & (page_size - 1) or not 8 <= page_size <= 64:
        raise ValueError(f"hydra: page_size must be a power of two in [8, 64], got {page_size}")
    _tensor(pages, "pages")
    if pages.dtype != torch.int32:
        raise TypeError(f"hydra: pages must be int32, got {pages.dtype}")
    if pages.dim() != 3 or tuple(pages.shape[:2]) != (B, Hkv) or pages.shape[2] < 1:
        raise ValueError(f"hydra: pages must have shape ({B}, {Hkv}, n >= 1), got {tuple(pages.shape)}")
    if pages.stride(-1) != 1:
        raise ValueError(f"hydra: pages must have a contiguous last dimension, got strides {pages.stride()}")
    scale = _scale(scale, D)
    _cache_seqlens(cache_seqlens, B)
    _cache_seqlens(cache_leftpad, B, "cache_leftpad")
    _out(out, q)
    _devices([("q", q), ("k", k), ("v", v), ("pages", pages), ("cache_seqlens", cache_seqlens),
              ("cache_leftpad", cache_leftpad), ("out", out)])
    return {"scale": scale}


def validate_page_summaries_call(k, *, page_size, cache_seqlens, cache_leftpad=None, dtype=None, scale=1.0):
    _tensor(k, "k")
    if k.dim() != 4:
        raise ValueError(f"hydra: k must be 4-D (B, Hkv, Tkv, D), got shape {tuple(k.shape)}")
    if k.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hydra: k must be bf16 or fp16, got {k.dtype}")
    if k.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"hydra: head dim D must be one of {SUPPORTED_HEAD_DIMS}, got D={k.shape[3]}")
    if k.shape[2] < 1:
        raise ValueError(f"hydra: k must hold at least one token, got Tkv={k.shape[2]}")
    _int_arg(page_size, "page_size", 1)
    if page_size & (page_size - 1) or not 8 <= page_size <= 64:
        raise ValueError(f"hydra: page_size must be a power of two in [8, 64], got {page_size}")
    if k.stride(-1) != 1 or any(s % _ALIGN for s in k.stride()[:-1]):
        raise ValueError(f"hydra: k must have a contiguous last dimension and 16-byte aligned strides, "
                         f"got strides {k.stride()}")
    _cache_seqlens(cache_seqlens, k.shape[0])
    _cache_seqlens(cache_leftpad, k.shape[0], "cache_leftpad")
    if dtype is not None and dtype not in (k.dtype, torch.float8_e4m3fn):
        raise TypeError(f"hydra: page_summaries dtype must be None, k's dtype ({k.dtype}) or "
                        f"torch.float8_e4m3fn, got {dtype}")
    check_summary_scale(scale, "page_summaries scale")
    _devices([("k", k), ("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)])


def check_cache_seqlens_values(cache_seqlens, Tkv):
    """Debug only: reads the device tensor (host sync)."""
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 1 or hi > Tkv:
        raise ValueError(f"hydra: cache_seqlens values must lie in [1, Tkv={Tkv}], got min={lo}, max={hi}")


def check_cache_leftpad_values(cache_leftpad, cache_seqlens, Tkv):
    """Debug only: every sequence keeps at least one token after its padding."""
    ends = cache_seqlens.long() if cache_seqlens is not None else torch.full_like(cache_leftpad, Tkv).long()
    bad = (cache_leftpad.long() < 0) | (cache_leftpad.long() >= ends)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"hydra: cache_leftpad values must lie in [0, length - 1]; sequence {i} has "
                         f"cache_leftpad={int(cache_leftpad[i])} and length {int(ends[i])}")


def check_pages_values(pages):
    """Debug only: valid entries must ascend along the last dimension."""
    big = torch.iinfo(torch.int32).max
    filled = torch.where(pages < 0, torch.full_like(pages, big), pages)
    if pages.shape[-1] > 1 and bool((filled[..., 1:] < filled[..., :-1]).any()):
        raise ValueError("hydra: pages must list ascending page indices per (sequence, KV head) "
                         "with -1 padding at the end")
