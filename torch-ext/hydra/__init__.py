"""hydra: bounded-budget sparse attention for long-context decode.

Each decode step attends to sink tokens, a recent window and the older KV pages
that score highest for the current query (Quest's bound summed over the GQA
group), through one fused split-KV attention kernel. See README.md and SPEC.md.

>>> out = hydra.hydra(q, k, v)                       # q (B, Hq, 1, D), k/v (B, Hkv, T, D), bf16/fp16, CUDA
>>> summ = hydra.page_summaries(k)                   # cache these; each step then reads 1/8 of K
>>> out = hydra.hydra(q, k, v, page_summaries=summ)
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from . import reference
from ._ops import add_op_namespace_prefix, ops
from ._validate import (
    _INV_SQRT_D,
    check_cache_leftpad_values,
    check_cache_seqlens_values,
    check_pages_values,
    validate_decode_call,
    validate_page_summaries_call,
    validate_sparse_attention_call,
)
from .policy import PRESETS, SCORERS, SUMMARY_DTYPES, HydraPolicy, resolve_policy
from .reference import superpage_summaries
from .cache import HydraKVCache  # noqa: E402  (after the ops it uses)
from .integrations.attention import hydra_attention  # noqa: E402  (transformers' attention signature)

# transformers (5.18 and later) accepts a Hub kernel as attn_implementation="<repo>:<function>"
# only if the kernel also exports flash_attn_varlen_func, sparse_atten_func or flash_attn_forward
# (an attention-interface forward). hydra_attention is such a forward; this alias is that marker.
flash_attn_forward = hydra_attention

__all__ = [
    "hydra",
    "select_pages",
    "sparse_attention",
    "page_summaries",
    "superpage_summaries",
    "HydraPolicy",
    "HydraKVCache",
    "hydra_attention",
    "PRESETS",
    "SCORERS",
    "SUMMARY_DTYPES",
    "reference",
    "set_debug",
    "source_digest",
]

__version__ = "0.1.0"

# Value checks on device tensors (cache_seqlens bounds, page order) need a host
# sync, so they run only in debug mode: HYDRA_DEBUG=1 or hydra.set_debug(True).
_debug = os.environ.get("HYDRA_DEBUG", "0") == "1"


def set_debug(enabled: bool = True) -> None:
    """Turn on checks that read device tensors (and so sync the host)."""
    global _debug
    _debug = bool(enabled)


def _debug_enabled() -> bool:
    return _debug


def source_digest(root=None) -> str:
    """sha256 over csrc/ and torch-ext/ of a source checkout (see hydra.evidence)."""
    from .evidence import source_digest as _digest

    return _digest(root)


def _require_ops():
    if ops is None:
        from . import _ops as _loader

        raise RuntimeError(
            "hydra: the CUDA extension is not available "
            f"({getattr(_loader, 'build_error', None)}); hydra.reference runs the same contract in PyTorch")


_PRESET_POLICIES = {name: resolve_policy(name) for name in PRESETS}

# (precision, policy) -> the resolved policy. resolve_policy builds and checks a new
# HydraPolicy (~10-20 us of host time); policies are frozen dataclasses, so a call that
# passes the same policy again finds it here. Bounded: a caller that makes a new policy
# every call resolves each one.
_RESOLVED: dict = {}
_RESOLVED_MAX = 256


def _policy(precision, policy) -> HydraPolicy:
    if policy is None and isinstance(precision, str) and precision in _PRESET_POLICIES:
        return _PRESET_POLICIES[precision]
    try:
        return _RESOLVED[(precision, policy)]
    except (KeyError, TypeError):  # not seen yet, or unhashable (then resolve_policy names it)
        pass
    pol = resolve_policy(precision, policy)
    if len(_RESOLVED) < _RESOLVED_MAX:
        _RESOLVED[(precision, policy)] = pol
    return pol


def _coarse_ints(pol: HydraPolicy):
    """(superpage, shortlist superpages) for the ops: (0, 0) for flat selection."""
    return (pol.superpage, pol.n_short) if pol.coarse else (0, 0)


def _fast_ints(pol: HydraPolicy):
    """The decode op's integer arguments (page_size, superpage, shortlist_pages,
    sink_tokens, recent_tokens, budget_tokens, window) and dense_layers for a policy
    that selects pages (flat, or coarse-to-fine: superpage > 0); None for exact ones."""
    if pol.exact:
        return None
    S, n_short = _coarse_ints(pol)
    return (pol.page_size, S, n_short, pol.sink_tokens, pol.recent_tokens, pol.budget_tokens, 0), pol.dense_layers


# The eager fast path's arguments for each preset (no policy resolved per call).
_FAST_PRESETS = {name: _fast_ints(p) for name, p in _PRESET_POLICIES.items() if _fast_ints(p) is not None}


def _fast_args(precision, policy):
    """_fast_ints of the call's policy, or None where the fast path does not apply."""
    if policy is None:
        return _FAST_PRESETS.get(precision) if type(precision) is str else None
    if type(policy) is not HydraPolicy:
        return None
    try:
        return _fast_ints(_policy(precision, policy))
    except Exception:  # a bad precision: the checked path names it
        return None


def _is_exact(pol: HydraPolicy, policy_layer_idx) -> bool:
    return pol.exact or (policy_layer_idx is not None and policy_layer_idx < pol.dense_layers)


def _budget_window(pol, sliding_window, policy_layer_idx):
    """(budget_tokens, window) for the decode op: a sliding window attends its window,
    exact cases every token (budget 0), otherwise the policy's budget."""
    if sliding_window is not None:
        return 0, int(sliding_window)
    if _is_exact(pol, policy_layer_idx):
        return 0, 0
    return pol.budget_tokens, 0


def _fast_scalars(sliding_window, policy_layer_idx, scale) -> bool:
    """Whether the scalar arguments take the fast paths (_fast_decode, _fast_cache_step):
    each None or of the one type and range the checked path accepts (an int window >= 1,
    an int layer index >= 0, a finite positive float scale). Anything else goes through
    the full checks, which name the argument."""
    return ((sliding_window is None or (type(sliding_window) is int and sliding_window >= 1))
            and (policy_layer_idx is None or (type(policy_layer_idx) is int and policy_layer_idx >= 0))
            and (scale is None or (type(scale) is float and 0.0 < scale < math.inf)))


def _new_lse(q):
    """The fp32 (B, Hq, Tq) log-sum-exp buffer the ops write next to a given ``out``."""
    return torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


def _fast_decode(q, k, v, cache_seqlens, page_summaries, superpage_summaries, fast_args, scale, policy_layer_idx,
                 sliding_window, cache_leftpad, out):
    """The common eager decode call (a selecting policy: flat, or coarse-to-fine with
    both summary levels given) in one op call: ``decode_alloc``, or ``decode`` into a
    given ``out``.

    The op checks every property the Python checks would (types, ranks, shapes, dtypes,
    strides, devices: hydra_torch.cpp) before any kernel runs; the one thing it cannot
    know, that the summaries were built with this page size (and superpage), is checked
    here, with the scalar arguments. Returns None where anything is off (an argument, the
    op refused the input, or the call is not a decode step); the caller then runs the full
    checks, which raise the error that names the argument, or build missing superpage
    summaries. A refused op has written nothing, so the checked path may call it again."""
    if not _fast_scalars(sliding_window, policy_layer_idx, scale):
        return None
    ints, dense_layers = fast_args
    S = ints[1]
    # Coarse-to-fine needs both levels (missing ones are built on the checked path);
    # superpage summaries with a flat policy are an error the checked path names.
    if (superpage_summaries is not None) != (S > 0) or (S > 0 and page_summaries is None):
        return None
    if sliding_window is not None:  # a sliding-window layer attends its window, no selection
        ints = ints[:5] + (0, sliding_window)
    elif policy_layer_idx is not None and policy_layer_idx < dense_layers:
        ints = ints[:5] + (0, 0)  # a dense layer: budget 0 attends every token
    try:
        qs = q.shape
        if qs[2] != 1:
            return None
        if page_summaries is not None:
            n_pages = -(-k.shape[2] // ints[0])
            if page_summaries.shape[2] != n_pages or (S > 0 and superpage_summaries.shape[2] != -(-n_pages // S)):
                return None
        sc = _INV_SQRT_D[qs[3]] if scale is None else scale
        if out is None:
            return ops.decode_alloc(q, k, v, None, page_summaries, superpage_summaries, cache_seqlens, cache_leftpad,
                                    *ints, sc)
        lse = _new_lse(q)
        ops.decode(q, k, v, None, page_summaries, superpage_summaries, cache_seqlens, cache_leftpad, *ints, sc, out,
                   lse)
        return out, lse
    except Exception:
        return None


def _coarse_args(pol, q, k, cache_seqlens, summaries, super_summaries, cache_leftpad=None):
    """(page summaries, superpage summaries, superpage, shortlist length) for the ops.
    Coarse-to-fine needs both levels; missing ones are built here (slow: cache them,
    as HydraKVCache does)."""
    if not pol.coarse:
        return summaries, None, 0, 0
    if summaries is None:
        summaries = torch.empty((k.shape[0], k.shape[1], -(-k.shape[2] // pol.page_size), 2, k.shape[3]),
                                dtype=pol.summary_torch_dtype or k.dtype, device=k.device)
        ops.page_summaries(k, cache_seqlens, cache_leftpad, pol.page_size, pol.summary_scale, summaries)
    if super_summaries is None:
        super_summaries = superpage_summaries(summaries, pol.superpage)
    return (summaries, super_summaries) + _coarse_ints(pol)


def hydra(q, k, v, *, is_causal=True, sliding_window=None, policy_layer_idx=None, precision="high",
          policy=None, cache_seqlens=None, page_summaries=None, scale=None, return_lse=False, out=None,
          superpage_summaries=None, cache_leftpad=None):
    """Causal attention over a bounded resident set of the KV cache.

    Parameters
    ----------
    q : Tensor (B, Hq, Tq, D), bf16 or fp16, CUDA. Tq == 1 is decode; Tq == Tkv is causal
        prefill (any T; D = 64, 128 or 256; query block i of 64 tokens attends the sink, local and
        top-scoring key blocks, or every earlier block when T <= budget or precision "exact").
    k, v : Tensor (B, Hkv, Tkv, D), q's dtype, on q's device. ``Hq % Hkv == 0``. Only the
        last dimension must be contiguous: ``K[:, :, :T]`` of a larger cache works.
    is_causal : must be True.
    sliding_window : int, optional. Marks a sliding-window layer: attend exactly the
        last ``sliding_window`` valid tokens, with no selection.
    policy_layer_idx : int, optional. Layers below ``policy.dense_layers`` attend densely.
    precision : "high" (default), "balanced", "fast" or "exact".
    policy : HydraPolicy, optional. Fields that differ from the defaults override the preset.
    cache_seqlens : int32 Tensor (B,), optional. Valid length of each sequence (<= Tkv);
        later positions are never read.
    cache_leftpad : int32 Tensor (B,), optional. Left padding, as in FlashAttention's
        ``flash_attn_with_kvcache``: sequence b holds the tokens ``[cache_leftpad[b], L_b)``;
        earlier positions are never read, and pages, sinks and windows count from the
        first valid token (page summaries must be built with the same ``cache_leftpad``).
    page_summaries : Tensor (B, Hkv, ceil(Tkv / page_size), 2, D), optional. Cached
        output of :func:`page_summaries`; without it each step reads all of K to score pages.
    superpage_summaries : Tensor (B, Hkv, ceil(n_pages / superpage), 2, D), optional.
        Coarse-to-fine policies (``HydraPolicy(superpage=S)``): cached output of
        :func:`superpage_summaries`; built from the page summaries when missing.
    scale : float, optional. Softmax scale, default ``1 / sqrt(D)``.
    return_lse : bool. Also return the fp32 (B, Hq, Tq) natural-log sum-exp.
    out : Tensor like q, optional. Written in place and returned.

    Returns
    -------
    Tensor (B, Hq, Tq, D) in q's dtype, and the LSE if ``return_lse``.

    Examples
    --------
    >>> o = hydra.hydra(q, k, v, precision="balanced", cache_seqlens=lens)
    """
    if is_causal is True and not _debug:
        fast_args = _fast_args(precision, policy)
        if fast_args is not None:
            res = _fast_decode(q, k, v, cache_seqlens, page_summaries, superpage_summaries, fast_args, scale,
                               policy_layer_idx, sliding_window, cache_leftpad, out)
            if res is not None:
                return res if return_lse else res[0]
    pol = _policy(precision, policy)
    info = validate_decode_call(q, k, v, is_causal=is_causal, sliding_window=sliding_window,
                                policy_layer_idx=policy_layer_idx, policy=pol, cache_seqlens=cache_seqlens,
                                page_summaries=page_summaries, scale=scale, out=out,
                                superpage_summaries=superpage_summaries, cache_leftpad=cache_leftpad)
    if _debug:
        if cache_seqlens is not None:
            check_cache_seqlens_values(cache_seqlens, k.shape[2])
        if cache_leftpad is not None:
            check_cache_leftpad_values(cache_leftpad, cache_seqlens, k.shape[2])
    _require_ops()
    budget, window = _budget_window(pol, sliding_window, policy_layer_idx)
    if q.shape[2] > 1:  # causal prefill (Tq == Tkv)
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = _new_lse(q)
        ops.prefill(q, k, v, pol.sink_tokens, pol.recent_tokens, budget, window, info["scale"], out, lse)
        return (out, lse) if return_lse else out
    summaries, supers, S, n_short = None, None, 0, 0
    if budget > 0:
        summaries, supers, S, n_short = _coarse_args(pol, q, k, cache_seqlens, page_summaries, superpage_summaries,
                                                     cache_leftpad)
    if out is None:  # allocated in C++: one op call on the eager hot path
        out, lse = ops.decode_alloc(q, k, v, None, summaries, supers, cache_seqlens, cache_leftpad, pol.page_size, S,
                                    n_short, pol.sink_tokens, pol.recent_tokens, budget, window, info["scale"])
    else:
        lse = _new_lse(q)
        ops.decode(q, k, v, None, summaries, supers, cache_seqlens, cache_leftpad, pol.page_size, S, n_short,
                   pol.sink_tokens, pol.recent_tokens, budget, window, info["scale"], out, lse)
    return (out, lse) if return_lse else out


# HydraKVCache.step keyword arguments its fast path takes (what the transformers
# integration passes); any other goes through _cache_step.
_STEP_FAST_ARGS = frozenset(("sliding_window", "policy_layer_idx", "scale", "return_lse", "out"))


def _fast_cache_step(cache, q, k_new, v_new, sliding_window=None, policy_layer_idx=None, scale=None,
                     return_lse=False, out=None):
    """HydraKVCache.step with the cache's own policy, in one op call that also allocates
    the output (or writes a given ``out``; see _fast_decode). Returns (out, lse), or None,
    before the op runs, where an argument needs the full checks. The op checks its
    tensors in C++ before it launches anything; where it refuses them, the step's full
    checks run and raise the error that names the argument, or, where they pass, the op's
    own error is raised. The op writes the cache, so one step never calls it twice."""
    if type(return_lse) is not bool or not _fast_scalars(sliding_window, policy_layer_idx, scale):
        return None
    pol = cache.policy
    if scale is None:
        scale = cache._default_scale
    budget, window = _budget_window(pol, sliding_window, policy_layer_idx)
    S, n_short = _coarse_ints(pol)
    k, v, summ, supers = cache._operands(1)
    try:
        if out is None:
            return ops.decode_append_alloc(q, k_new, v_new, k, v, summ, supers, cache._lengths, cache._overflow,
                                           pol.page_size, S, n_short, pol.sink_tokens, pol.recent_tokens, budget,
                                           window, scale, cache.summary_scale)
        lse = _new_lse(q)
        ops.decode_append(q, k_new, v_new, k, v, summ, supers, cache._lengths, cache._overflow, pol.page_size, S,
                          n_short, pol.sink_tokens, pol.recent_tokens, budget, window, scale, cache.summary_scale,
                          out, lse)
        return out, lse
    except Exception:
        cache._check_step_inputs(k_new, v_new)
        validate_decode_call(q, k, v, is_causal=True, sliding_window=sliding_window,
                             policy_layer_idx=policy_layer_idx, policy=pol, cache_seqlens=cache.seqlens,
                             page_summaries=summ, scale=scale, out=out, superpage_summaries=supers)
        _require_ops()
        raise


def _cache_step(cache, q, k_new, v_new, *, sliding_window=None, policy_layer_idx=None, precision="high",
                policy=None, scale=None, return_lse=False, out=None):
    """HydraKVCache.step: append one token per sequence, then decode over the grown cache."""
    pol = _policy(precision, policy)
    if pol.page_size != cache.policy.page_size:
        raise ValueError(f"hydra: the step's policy page_size={pol.page_size} differs from the cache's "
                         f"summaries (page_size={cache.policy.page_size})")
    if pol.superpage != cache.policy.superpage:
        raise ValueError(f"hydra: the step's policy superpage={pol.superpage} differs from the cache's "
                         f"(superpage={cache.policy.superpage})")
    k, v, summ, supers = cache._operands(1)
    info = validate_decode_call(q, k, v, is_causal=True, sliding_window=sliding_window,
                                policy_layer_idx=policy_layer_idx, policy=pol, cache_seqlens=cache.seqlens,
                                page_summaries=summ, scale=scale, out=out, superpage_summaries=supers)
    _require_ops()
    budget, window = _budget_window(pol, sliding_window, policy_layer_idx)
    if out is None:
        out = torch.empty_like(q)
    lse = _new_lse(q)
    S, n_short = _coarse_ints(pol)
    ops.decode_append(q, k_new, v_new, k, v, summ, supers, cache.seqlens, cache._overflow, pol.page_size, S, n_short, pol.sink_tokens, pol.recent_tokens, budget, window,
                      info["scale"], cache.summary_scale, out, lse)
    return (out, lse) if return_lse else out


def select_pages(q, k, *, is_causal=True, sliding_window=None, policy_layer_idx=None, precision="high",
                 policy=None, cache_seqlens=None, page_summaries=None, superpage_summaries=None, cache_leftpad=None):
    """The pages a decode step attends to, per (sequence, KV head).

    Returns
    -------
    int32 Tensor (B, Hkv, n_sel): ascending page indices padded with -1, where
    ``n_sel = budget_tokens // page_size``, or ``ceil(Tkv / page_size)`` for the
    exact cases known from the arguments (precision "exact", dense layers).
    Sequences with ``L <= budget_tokens`` list all their pages. With ``cache_leftpad``
    the pages count from each sequence's first valid token.
    """
    if sliding_window is not None:
        raise ValueError(f"hydra: select_pages does not apply to sliding-window layers "
                         f"(sliding_window={sliding_window!r}); they attend exactly the last window")
    pol = _policy(precision, policy)
    validate_decode_call(q, k, None, is_causal=is_causal, sliding_window=sliding_window,
                         policy_layer_idx=policy_layer_idx, policy=pol, cache_seqlens=cache_seqlens,
                         page_summaries=page_summaries, scale=None, out=None,
                         superpage_summaries=superpage_summaries, cache_leftpad=cache_leftpad)
    _require_ops()
    B, Hkv, Tkv, _ = k.shape
    P = pol.page_size
    if _is_exact(pol, policy_layer_idx):
        n_pages = -(-Tkv // P)
        idx = torch.arange(n_pages, dtype=torch.int32, device=q.device).expand(B, Hkv, n_pages)
        lens = cache_seqlens if cache_seqlens is not None else torch.full((B,), Tkv, dtype=torch.int32,
                                                                            device=q.device)
        if cache_leftpad is not None:
            lens = lens - cache_leftpad
        valid = idx < ((lens + (P - 1)) // P).view(B, 1, 1)
        return torch.where(valid, idx, torch.full_like(idx, -1)).contiguous()
    pages = torch.empty((B, Hkv, pol.n_sel), dtype=torch.int32, device=q.device)
    summaries, supers, S, n_short = _coarse_args(pol, q, k, cache_seqlens, page_summaries, superpage_summaries,
                                                 cache_leftpad)
    ops.select_pages(q, k, summaries, supers, cache_seqlens, cache_leftpad, P, S, n_short, pol.sink_tokens, pol.recent_tokens,
                     pol.budget_tokens, pages)
    return pages


def sparse_attention(q, k, v, pages, *, page_size=16, cache_seqlens=None, scale=None, return_lse=False,
                     out=None, cache_leftpad=None):
    """Decode attention over an explicit page list.

    Parameters
    ----------
    q : (B, Hq, 1, D); k, v : (B, Hkv, Tkv, D), bf16 or fp16, CUDA.
    pages : int32 (B, Hkv, n). Ascending page indices per (sequence, KV head), as
        :func:`select_pages` returns them; -1 entries are skipped and a page repeated
        in consecutive entries is attended once. Tokens ``>= L`` are never read.
    page_size : tokens per page (power of two, 8..64).
    cache_leftpad : int32 (B,), optional. First valid positions; pages count from them.

    Returns
    -------
    (B, Hq, 1, D) in q's dtype, plus the fp32 (B, Hq, 1) LSE if ``return_lse``.
    """
    info = validate_sparse_attention_call(q, k, v, pages, page_size=page_size, cache_seqlens=cache_seqlens,
                                          scale=scale, out=out, cache_leftpad=cache_leftpad)
    if _debug:
        if cache_seqlens is not None:
            check_cache_seqlens_values(cache_seqlens, k.shape[2])
        if cache_leftpad is not None:
            check_cache_leftpad_values(cache_leftpad, cache_seqlens, k.shape[2])
        check_pages_values(pages)
    _require_ops()
    if out is None:
        out, lse = ops.decode_alloc(q, k, v, pages, None, None, cache_seqlens, cache_leftpad, page_size, 0, 0, 0,
                                    0, 0, 0, info["scale"])
    else:
        lse = _new_lse(q)
        ops.decode(q, k, v, pages, None, None, cache_seqlens, cache_leftpad, page_size, 0, 0, 0, 0, 0, 0,
                   info["scale"], out, lse)
    return (out, lse) if return_lse else out


def page_summaries(k, *, page_size=16, cache_seqlens=None, cache_leftpad=None, dtype=None, scale=1.0):
    """Elementwise min and max of the keys over each page.

    Parameters
    ----------
    dtype : None (k's dtype: the exact min/max) or ``torch.float8_e4m3fn``: the min and
        max of ``k * scale`` rounded outward to e4m3 (min down, max up), so the bound
        still holds; a decode step then reads half the summary bytes. Values beyond
        e4m3's +-448 saturate and are read as +-2^64 (see ``hydra.reference``).
    scale : a power of two in [2^-16, 2^16] (e4m3 only). One scale for every page, so
        it changes no ranking; pick it so that ``|k| * scale`` stays under 448.

    Returns
    -------
    Tensor (B, Hkv, ceil(Tkv / page_size), 2, D) in ``dtype``: ``[..., 0, :]`` is the
    min and ``[..., 1, :]`` the max over the page's valid tokens (``< L``). Pages with
    no valid token hold +inf / -inf (e4m3: 448 / -448). With ``cache_leftpad`` pages count from each
    sequence's first valid token (the layout ``hydra(..., cache_leftpad=...)`` expects).

    Examples
    --------
    >>> summ = hydra.page_summaries(k, cache_seqlens=lens)  # reuse across decode steps
    """
    validate_page_summaries_call(k, page_size=page_size, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
                                 dtype=dtype, scale=scale)
    if _debug:
        if cache_seqlens is not None:
            check_cache_seqlens_values(cache_seqlens, k.shape[2])
        if cache_leftpad is not None:
            check_cache_leftpad_values(cache_leftpad, cache_seqlens, k.shape[2])
    _require_ops()
    B, Hkv, Tkv, D = k.shape
    out = torch.empty((B, Hkv, -(-Tkv // page_size), 2, D), dtype=dtype or k.dtype, device=k.device)
    ops.page_summaries(k, cache_seqlens, cache_leftpad, page_size, float(scale), out)
    return out


if ops is not None:

    @torch.library.register_fake(add_op_namespace_prefix("page_summaries"))
    def _page_summaries_fake(k, cache_seqlens, cache_leftpad, page_size, summary_scale, out):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("select_pages"))
    def _select_pages_fake(q, k, summaries, super_summaries, cache_seqlens, cache_leftpad, page_size, superpage,
                           shortlist_pages,
                           sink_tokens, recent_tokens, budget_tokens, pages):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("decode"))
    def _decode_fake(q, k, v, pages, summaries, super_summaries, cache_seqlens, cache_leftpad, page_size, superpage,
                     shortlist_pages, sink_tokens, recent_tokens, budget_tokens, window, scale, out, lse):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("cache_prefill"))
    def _cache_prefill_fake(k, v, seqlens, page_size, k_cache, v_cache, summaries, lengths, overflow, summary_scale):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("cache_append"))
    def _cache_append_fake(k_new, v_new, counts, page_size, k_cache, v_cache, summaries, super_summaries,
                           superpage, lengths, overflow, summary_scale):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("decode_append"))
    def _decode_append_fake(q, k_new, v_new, k_cache, v_cache, summaries, super_summaries, lengths, overflow,
                            page_size, superpage, shortlist_pages, sink_tokens, recent_tokens, budget_tokens,
                            window, scale, summary_scale, out, lse):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("decode_append_alloc"))
    def _decode_append_alloc_fake(q, k_new, v_new, k_cache, v_cache, summaries, super_summaries, lengths, overflow,
                                  page_size, superpage, shortlist_pages, sink_tokens, recent_tokens, budget_tokens,
                                  window, scale, summary_scale):
        B, Hq, Tq, D = q.shape
        return q.new_empty((B, Hq, Tq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)

    @torch.library.register_fake(add_op_namespace_prefix("prefill"))
    def _prefill_fake(q, k, v, sink_tokens, recent_tokens, budget_tokens, window, scale, out, lse):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("prefill_blocks"))
    def _prefill_blocks_fake(q, k, sink_tokens, recent_tokens, budget_tokens, blocks):
        return None

    @torch.library.register_fake(add_op_namespace_prefix("decode_alloc"))
    def _decode_alloc_fake(q, k, v, pages, summaries, super_summaries, cache_seqlens, cache_leftpad, page_size,
                           superpage,
                           shortlist_pages, sink_tokens, recent_tokens, budget_tokens, window, scale):
        B, Hq, Tq, D = q.shape
        return q.new_empty((B, Hq, Tq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)
