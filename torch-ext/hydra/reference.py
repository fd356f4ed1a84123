"""Pure-PyTorch reference for the whole hydra contract (SPEC sections 1-3).

This module *is* the specification the CUDA kernels must match. It is written
for clarity, not speed: every function upcasts to fp32, runs on any device and
accepts any head dimension and floating dtype. Nothing here allocates a
``T x T`` tensor for prefill selection; the prefill attention itself loops over
query blocks so that its memory stays O(block_size * T).

Conventions shared by every function:

* ``q`` is ``(B, Hq, Tq, D)``; ``k`` and ``v`` are ``(B, Hkv, Tkv, D)`` with
  ``Hq % Hkv == 0``. KV head ``h`` serves the query heads ``h*G .. h*G + G - 1``
  where ``G = Hq // Hkv`` (the GQA group).
* ``cache_seqlens`` is an optional integer ``(B,)`` tensor of valid lengths
  ``L_b`` in ``[1, Tkv]``; key/value positions ``>= L_b`` never influence any
  result (they may hold NaN).
* ``cache_leftpad`` is an optional integer ``(B,)`` tensor of first valid
  positions (left padding, as in FlashAttention's ``flash_attn_with_kvcache``):
  sequence ``b`` holds the tokens ``[leftpad_b, L_b)``, and positions, pages,
  sinks and windows count from ``leftpad_b``, as if the padding were not there.
  Positions ``< leftpad_b`` never influence any result.
* Page ``p`` covers tokens ``[p*P, min((p+1)*P, L))``; ``n_pages = ceil(Tkv/P)``.
* An attended set that is empty (only reachable through ``sparse_attention``
  with nothing valid listed) gives an output of 0 and a log-sum-exp of -inf.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .policy import HydraPolicy, check_summary_scale, resolve_policy

__all__ = [
    "page_summaries",
    "decode_summaries",
    "e4m3_round_outward",
    "superpage_summaries",
    "page_scores",
    "select_pages",
    "attended_token_mask",
    "sparse_attention",
    "attention_with_mask",
    "prefill_block_mask",
    "hydra",
]


# --------------------------------------------------------------------------- #
# Light validation                                                            #
# --------------------------------------------------------------------------- #

def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_4d(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"hydra: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"hydra: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"hydra: {name} must be a floating tensor, got {t.dtype}")


def _check_qk(q: Tensor, k: Tensor) -> None:
    """Shapes, dtypes and devices shared by q and k (and v, checked separately)."""
    _check_4d("q", q)
    _check_4d("k", k)
    if k.device != q.device:
        raise ValueError(f"hydra: k must be on q's device ({q.device}), got {k.device}")
    if k.dtype != q.dtype:
        raise TypeError(f"hydra: k must be {q.dtype} like q, got {k.dtype}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"hydra: k must have q's batch size {q.shape[0]}, got k.shape={tuple(k.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"hydra: k must have q's head dim {q.shape[3]}, got k.shape={tuple(k.shape)}")
    if k.shape[2] < 1:
        raise ValueError(f"hydra: k must hold at least one token, got k.shape={tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"hydra: q heads must be a multiple of k heads (Hq % Hkv == 0), got Hq={q.shape[1]}, "
            f"Hkv={k.shape[1]}")


def _check_v(q: Tensor, k: Tensor, v: Tensor) -> None:
    _check_4d("v", v)
    if v.device != q.device:
        raise ValueError(f"hydra: v must be on q's device ({q.device}), got {v.device}")
    if v.dtype != q.dtype:
        raise TypeError(f"hydra: v must be {q.dtype} like q, got {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(
            f"hydra: v must have k's shape {tuple(k.shape)}, got v.shape={tuple(v.shape)}")


def _check_decode_q(q: Tensor, what: str) -> None:
    if q.shape[2] != 1:
        raise ValueError(f"hydra: {what} is decode-only and needs Tq == 1, got q.shape={tuple(q.shape)}")


def _valid_lengths(cache_seqlens: Optional[Tensor], B: int, Tkv: int, device) -> Tensor:
    """``L`` as an int64 ``(B,)`` tensor on ``device``; ``Tkv`` for every row when None."""
    if cache_seqlens is None:
        return torch.full((B,), Tkv, dtype=torch.int64, device=device)
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"hydra: cache_seqlens must be a tensor or None, got {type(cache_seqlens).__name__}")
    if cache_seqlens.is_floating_point() or cache_seqlens.is_complex() or cache_seqlens.dtype == torch.bool:
        raise TypeError(f"hydra: cache_seqlens must be an int32 tensor, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"hydra: cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    L = cache_seqlens.to(device=device, dtype=torch.int64)
    # The reference may sync: it checks values the kernels cannot check cheaply.
    lo, hi = int(L.min()), int(L.max())
    if lo < 1 or hi > Tkv:
        raise ValueError(
            f"hydra: cache_seqlens values must lie in [1, Tkv={Tkv}], got min {lo}, max {hi}")
    return L


def _drop_left_padding(cache_leftpad: Optional[Tensor], cache_seqlens: Optional[Tensor], B: int, Tkv: int,
                       device, *tensors: Tensor):
    """``cache_leftpad`` semantics as a layout change: each (B, H, Tkv, D) tensor is
    shifted left by ``leftpad_b`` along tokens, and the lengths become ``L_b - leftpad_b``.
    Returns (shifted tensors..., int32 lengths or the given ``cache_seqlens``)."""
    if cache_leftpad is None:
        return (*tensors, cache_seqlens)
    if not isinstance(cache_leftpad, Tensor):
        raise TypeError(f"hydra: cache_leftpad must be a tensor or None, got {type(cache_leftpad).__name__}")
    if cache_leftpad.is_floating_point() or cache_leftpad.is_complex() or cache_leftpad.dtype == torch.bool:
        raise TypeError(f"hydra: cache_leftpad must be an int32 tensor, got {cache_leftpad.dtype}")
    if tuple(cache_leftpad.shape) != (B,):
        raise ValueError(f"hydra: cache_leftpad must have shape ({B},), got {tuple(cache_leftpad.shape)}")
    L = _valid_lengths(cache_seqlens, B, Tkv, device)
    pad = cache_leftpad.to(device=device, dtype=torch.int64)
    if bool((pad < 0).any()) or bool((pad >= L).any()):
        raise ValueError(f"hydra: cache_leftpad values must lie in [0, cache_seqlens - 1], got "
                         f"{pad.tolist()} with lengths {L.tolist()}")
    idx = (torch.arange(Tkv, device=device).view(1, Tkv) + pad.view(B, 1)).clamp(max=Tkv - 1)
    shifted = tuple(t.gather(2, idx.view(B, 1, Tkv, 1).expand(B, t.shape[1], Tkv, t.shape[3])) for t in tensors)
    return (*shifted, (L - pad).to(torch.int32))


def _check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"hydra: scale must be a float or None, got {scale!r}")


def _check_sliding_window(sliding_window) -> None:
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
        raise TypeError(f"hydra: sliding_window must be a positive int or None, got {sliding_window!r}")
    if sliding_window < 1:
        raise ValueError(f"hydra: sliding_window must be a positive int or None, got {sliding_window}")


def _check_layer_idx(policy_layer_idx) -> None:
    if policy_layer_idx is None:
        return
    if isinstance(policy_layer_idx, bool) or not isinstance(policy_layer_idx, int):
        raise TypeError(f"hydra: policy_layer_idx must be an int or None, got {policy_layer_idx!r}")
    if policy_layer_idx < 0:
        raise ValueError(f"hydra: policy_layer_idx must be >= 0, got {policy_layer_idx}")


def _is_dense(pol: HydraPolicy, policy_layer_idx: Optional[int]) -> bool:
    """Exact cases known from the arguments alone (SPEC 2, decode rule 1)."""
    return pol.exact or (policy_layer_idx is not None and policy_layer_idx < pol.dense_layers)


# --------------------------------------------------------------------------- #
# 8-bit (e4m3) page summaries                                                 #
# --------------------------------------------------------------------------- #
#
# ``page_summaries(k, dtype=torch.float8_e4m3fn, scale=s)`` stores each page's
# min and max of ``k * s`` as e4m3 values rounded outward: the min down to the
# largest e4m3 value <= it, the max up to the smallest e4m3 value >= it, so the
# Quest bound still holds. e4m3 ("fn": no infinities) ends at +-448: a min below
# -448 is stored as -448 and a max above 448 as 448, and the scorer reads those
# two codes (-448 as a min, 448 as a max) as -/+2^64 ("saturated"), which keeps
# the bound valid for any key. ``s`` is a power of two shared by every page, so
# it changes no ranking; it only keeps large keys inside the range.

E4M3_SATURATED = 2.0 ** 64
_E4M3_TABLE = {}


def _e4m3_table(device) -> Tensor:
    """The 253 distinct finite e4m3 values (one zero), ascending, fp32."""
    key = str(device)
    if key not in _E4M3_TABLE:
        v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        v = torch.unique(v[torch.isfinite(v)])
        _E4M3_TABLE[key] = torch.where(v == 0, 0.0, v).to(device)  # +0, never -0 (code 0x80)
    return _E4M3_TABLE[key]


def e4m3_round_outward(kmin: Tensor, kmax: Tensor):
    """(kmin rounded down, kmax rounded up) to e4m3 values, as float8_e4m3fn tensors.
    NaN is not expected (keys past a sequence's end are never summarised)."""
    t = _e4m3_table(kmin.device)
    lo = t[(torch.searchsorted(t, kmin.float().contiguous(), right=True) - 1).clamp(0, len(t) - 1)]
    hi = t[torch.searchsorted(t, kmax.float().contiguous()).clamp(0, len(t) - 1)]
    return lo.to(torch.float8_e4m3fn), hi.to(torch.float8_e4m3fn)


def decode_summaries(summaries: Tensor) -> Tensor:
    """Summaries as the scorer reads them, fp32: 16-bit ones exactly; e4m3 ones with
    the saturated codes (-448 as a min, 448 as a max) read as -/+2^64."""
    if summaries.dtype != torch.float8_e4m3fn:
        return summaries.float()
    f = summaries.float()
    mn = torch.where(f[..., 0, :] == -448.0, -E4M3_SATURATED, f[..., 0, :])
    mx = torch.where(f[..., 1, :] == 448.0, E4M3_SATURATED, f[..., 1, :])
    return torch.stack([mn, mx], dim=-2)


# --------------------------------------------------------------------------- #
# Scoring helpers                                                             #
# --------------------------------------------------------------------------- #

def _quest_bound(q_group: Tensor, summaries: Tensor) -> Tensor:
    """Quest upper bound summed over a GQA group.

    q_group   : (B, Hkv, G, D), fp32
    summaries : (B, Hkv, n, 2, D), [..., 0, :] = min, [..., 1, :] = max
    returns   : (B, Hkv, n) fp32,
                sum_g sum_d max(q[g, d] * kmin[p, d], q[g, d] * kmax[p, d])
    """
    dec = decode_summaries(summaries)
    kmin, kmax = dec[..., 0, :], dec[..., 1, :]
    B, Hkv, G, _ = q_group.shape
    total = torch.zeros(kmin.shape[:-1], dtype=torch.float32, device=kmin.device)
    for g in range(G):  # one query head at a time keeps memory at (B, Hkv, n, D)
        qg = q_group[:, :, g, None, :].float()
        total = total + torch.maximum(qg * kmin, qg * kmax).sum(dim=-1)
    return total


def _top_k_mask(scores: Tensor, candidates: Tensor, k) -> Tensor:
    """The ``k`` highest-scoring candidates of each row, ties to the lower index.

    scores     : (..., n) fp32
    candidates : (..., n) bool, broadcastable to scores
    k          : int, or an integer tensor of shape ``scores.shape[:-1]``
    returns    : (..., n) bool
    """
    candidates = candidates.expand_as(scores)
    n = scores.shape[-1]
    # Stable sorts: first by score (descending; equal scores keep index order),
    # then candidates before non-candidates, keeping that score order.
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    cand_first = torch.sort(candidates.gather(-1, by_score).to(torch.int8), dim=-1,
                            descending=True, stable=True).indices
    ranked = by_score.gather(-1, cand_first)
    is_cand = candidates.gather(-1, ranked)
    rank = torch.arange(n, device=scores.device)
    if not isinstance(k, Tensor):
        k = torch.tensor(k, device=scores.device)
    take = (rank < k.unsqueeze(-1)) & is_cand
    return torch.zeros_like(candidates).scatter(-1, ranked, take)


def _mask_to_page_list(page_mask: Tensor, width: int) -> Tensor:
    """(B, Hkv, n_pages) bool -> (B, Hkv, width) int32: ascending indices, -1 padded."""
    n = page_mask.shape[-1]
    count = int(page_mask.sum(dim=-1).max()) if page_mask.numel() else 0
    assert count <= width, f"internal: {count} pages selected for a list of {width}"
    idx = torch.arange(n, device=page_mask.device)
    key = torch.where(page_mask, idx, idx + n)  # selected pages first, each group ascending
    ordered = torch.sort(key, dim=-1).values
    pages = torch.where(ordered < n, ordered, torch.full_like(ordered, -1))
    if width <= n:
        pages = pages[..., :width]
    else:
        pad = torch.full((*pages.shape[:-1], width - n), -1, dtype=pages.dtype, device=pages.device)
        pages = torch.cat([pages, pad], dim=-1)
    return pages.to(torch.int32)


def _page_list_to_token_mask(pages: Tensor, n_pages: int, page_size: int, Tkv: int,
                             L: Tensor) -> Tensor:
    """(B, Hkv, n) page indices (-1 ignored) -> (B, Hkv, Tkv) bool of tokens < L in them."""
    B, Hkv, _ = pages.shape
    listed = pages >= 0
    page_mask = torch.zeros((B, Hkv, n_pages + 1), dtype=torch.bool, device=pages.device)
    # -1 entries go to a spare slot n_pages that is dropped; duplicates set the same bit.
    slot = torch.where(listed, pages.long(), torch.full_like(pages, n_pages, dtype=torch.long))
    page_mask.scatter_(-1, slot, torch.ones_like(slot, dtype=torch.bool))
    page_mask = page_mask[..., :n_pages]
    pos = torch.arange(Tkv, device=pages.device)
    token_mask = page_mask[..., pos // page_size]
    return token_mask & (pos < L.view(B, 1, 1))


# --------------------------------------------------------------------------- #
# Public functions                                                            #
# --------------------------------------------------------------------------- #

def page_summaries(k: Tensor, *, page_size: int = 16, cache_seqlens: Optional[Tensor] = None,
                   cache_leftpad: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None,
                   scale: float = 1.0) -> Tensor:
    """Per-page elementwise min and max of the keys.

    Parameters
    ----------
    k : Tensor, (B, Hkv, Tkv, D)
        Keys, any floating dtype.
    page_size : int
        Tokens per page ``P`` (any positive int here; the kernels take powers of
        two in [8, 64]).
    cache_seqlens : Tensor, (B,), optional
        Valid lengths ``L_b``; tokens ``>= L_b`` are ignored.
    cache_leftpad : Tensor, (B,), optional
        First valid positions; pages count from them (see the module notes).
    dtype : torch.dtype, optional
        k's dtype (default): exact. ``torch.float8_e4m3fn``: the min and max of
        ``k * scale`` rounded outward to e4m3 (see "8-bit page summaries" above).
    scale : float
        A power of two; used only with ``torch.float8_e4m3fn``.

    Returns
    -------
    Tensor, (B, Hkv, n_pages, 2, D), ``dtype``
        ``n_pages = ceil(Tkv / P)``. ``[..., 0, :]`` is the min and ``[..., 1, :]``
        the max over the page's valid tokens. A page with no valid token has
        min = +inf and max = -inf (e4m3: 448 and -448).

    Examples
    --------
    >>> k = torch.randn(1, 2, 40, 64)
    >>> page_summaries(k, page_size=16).shape
    torch.Size([1, 2, 3, 2, 64])
    """
    _check_4d("k", k)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"hydra: page_size must be a positive int, got {page_size!r}")
    B, Hkv, Tkv, D = k.shape
    k, cache_seqlens = _drop_left_padding(cache_leftpad, cache_seqlens, B, Tkv, k.device, k)
    P = page_size
    n_pages = _ceil_div(Tkv, P)
    L = _valid_lengths(cache_seqlens, B, Tkv, k.device)

    kf = k.float()
    padded = n_pages * P
    if padded > Tkv:
        kf = torch.cat([kf, kf.new_zeros(B, Hkv, padded - Tkv, D)], dim=2)
    valid = torch.arange(padded, device=k.device).view(1, 1, padded, 1) < L.view(B, 1, 1, 1)
    inf = torch.tensor(float("inf"), device=k.device)
    # torch.where (not multiplication) so NaN past L cannot leak in.
    kmin = torch.where(valid, kf, inf).view(B, Hkv, n_pages, P, D).amin(dim=3)
    kmax = torch.where(valid, kf, -inf).view(B, Hkv, n_pages, P, D).amax(dim=3)
    if dtype is not None and dtype == torch.float8_e4m3fn:
        check_summary_scale(scale, "page_summaries scale")
        lo, hi = e4m3_round_outward(kmin * scale, kmax * scale)
        return torch.stack([lo, hi], dim=3)
    if dtype is not None and dtype != k.dtype:
        raise ValueError(f"hydra: page_summaries dtype must be k's dtype ({k.dtype}) or torch.float8_e4m3fn, "
                         f"got {dtype}")
    return torch.stack([kmin, kmax], dim=3).to(k.dtype)


def page_scores(q: Tensor, summaries: Tensor, *, cache_seqlens: Optional[Tensor] = None,
                page_size: int = 16) -> Tensor:
    """Quest upper bound of each page, summed over the GQA group (SPEC 2.4).

    ``score[b, h, p] = sum_{j in group h} sum_d max(q[b, j, 0, d] * kmin[p, d],
    q[b, j, 0, d] * kmax[p, d])``, computed in fp32.

    Parameters
    ----------
    q : Tensor, (B, Hq, 1, D)
        Decode query.
    summaries : Tensor, (B, Hkv, n_pages, 2, D)
        Output of :func:`page_summaries` (min then max).
    cache_seqlens : Tensor, (B,), optional
        Valid lengths; pages starting at or after ``L_b`` score -inf.
    page_size : int
        Tokens per page, used only to place ``cache_seqlens`` on pages.

    Returns
    -------
    Tensor, (B, Hkv, n_pages), fp32
        Pages with no valid token (past ``L_b``, or an empty summary with
        min > max) score -inf.

    Examples
    --------
    >>> q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 100, 64)
    >>> page_scores(q, page_summaries(k)).shape
    torch.Size([1, 2, 7])
    """
    _check_4d("q", q)
    _check_decode_q(q, "page_scores")
    if not isinstance(summaries, Tensor) or summaries.dim() != 5 or summaries.shape[3] != 2:
        shape = tuple(summaries.shape) if isinstance(summaries, Tensor) else type(summaries).__name__
        raise ValueError(f"hydra: summaries must be (B, Hkv, n_pages, 2, D), got {shape}")
    B, Hq, _, D = q.shape
    Bs, Hkv, n_pages, _, Ds = summaries.shape
    if Bs != B or Ds != D or Hq % Hkv:
        raise ValueError(
            f"hydra: summaries must be (B={B}, Hkv dividing Hq={Hq}, n_pages, 2, D={D}), "
            f"got {tuple(summaries.shape)}")
    G = Hq // Hkv
    q_group = q.float().view(B, Hkv, G, D)
    scores = _quest_bound(q_group, summaries)

    dec = decode_summaries(summaries)
    empty = (dec[..., 0, :] > dec[..., 1, :]).any(dim=-1)
    if cache_seqlens is not None:
        # Any Tkv with these pages will do for the bounds check: L <= n_pages * P.
        L = _valid_lengths(cache_seqlens, B, n_pages * page_size, q.device)
        page_start = torch.arange(n_pages, device=q.device) * page_size
        empty = empty | (page_start.view(1, 1, -1) >= L.view(B, 1, 1))
    return scores.masked_fill(empty, float("-inf"))


def superpage_summaries(page_summaries: Tensor, superpage: int) -> Tensor:
    """Summaries of superpages of ``superpage`` consecutive pages, from page summaries.

    Parameters
    ----------
    page_summaries : Tensor, (B, Hkv, n_pages, 2, D)
        As :func:`page_summaries` returns them (empty pages +inf / -inf).
    superpage : int
        Pages per superpage (a power of two >= 2).

    Returns
    -------
    Tensor, (B, Hkv, ceil(n_pages / superpage), 2, D), same dtype: the elementwise
    min of the pages' minima and max of their maxima (exact: min/max of bf16 values).

    Examples
    --------
    >>> s = page_summaries(torch.randn(1, 2, 300, 64), page_size=8)   # 38 pages
    >>> superpage_summaries(s, 16).shape
    torch.Size([1, 2, 3, 2, 64])
    """
    if not isinstance(page_summaries, Tensor) or page_summaries.dim() != 5 or page_summaries.shape[3] != 2:
        shape = tuple(page_summaries.shape) if isinstance(page_summaries, Tensor) else type(page_summaries).__name__
        raise ValueError(f"hydra: page_summaries must be (B, Hkv, n_pages, 2, D), got {shape}")
    if not isinstance(superpage, int) or isinstance(superpage, bool) or superpage < 2 or superpage & (superpage - 1):
        raise ValueError(f"hydra: superpage must be a power of two >= 2, got {superpage!r}")
    B, H, n, _, D = page_summaries.shape
    n_super = _ceil_div(n, superpage)
    pad = n_super * superpage - n
    mn, mx = page_summaries[:, :, :, 0], page_summaries[:, :, :, 1]
    if page_summaries.dtype == torch.float8_e4m3fn:
        # min/max over e4m3 codes (compared as their values) are e4m3 codes, saturated
        # ones included; empty superpages hold 448 / -448 like empty pages.
        mn, mx = mn.float(), mx.float()
        if pad:
            big = torch.full((B, H, pad, D), 448.0, dtype=mn.dtype, device=mn.device)
            mn, mx = torch.cat([mn, big], dim=2), torch.cat([mx, -big], dim=2)
        mn = mn.reshape(B, H, n_super, superpage, D).amin(dim=3)
        mx = mx.reshape(B, H, n_super, superpage, D).amax(dim=3)
        return torch.stack([mn, mx], dim=3).to(torch.float8_e4m3fn)
    if pad:
        inf = torch.full((B, H, pad, D), float("inf"), dtype=mn.dtype, device=mn.device)
        mn, mx = torch.cat([mn, inf], dim=2), torch.cat([mx, -inf], dim=2)
    mn = mn.reshape(B, H, n_super, superpage, D).amin(dim=3)
    mx = mx.reshape(B, H, n_super, superpage, D).amax(dim=3)
    return torch.stack([mn, mx], dim=3)


def _shortlist_mask(q: Tensor, pol: HydraPolicy, candidates: Tensor, super_summ: Tensor,
                    cache_seqlens: Optional[Tensor], n_pages: int) -> Tensor:
    """Coarse-to-fine stage 1 as a (B, Hkv, n_pages) mask of the pages inside the
    ``n_short`` best-scoring superpages among those holding a candidate page."""
    S, P = pol.superpage, pol.page_size
    B, Hkv = super_summ.shape[:2]
    n_super = _ceil_div(n_pages, S)
    sp_scores = page_scores(q, super_summ[:, :, :n_super], cache_seqlens=cache_seqlens, page_size=P * S)
    pad = n_super * S - n_pages
    cand = candidates.expand(B, -1, n_pages)
    if pad:
        cand = torch.cat([cand, torch.zeros((*cand.shape[:-1], pad), dtype=torch.bool, device=cand.device)], -1)
    cand_sp = cand.reshape(B, -1, n_super, S).any(dim=-1)
    shortlisted = _top_k_mask(sp_scores, cand_sp, pol.n_short)
    return shortlisted.repeat_interleave(S, dim=-1)[..., :n_pages]


def _decode_page_mask(q: Tensor, k: Tensor, pol: HydraPolicy, dense: bool,
                      cache_seqlens: Optional[Tensor], summaries: Optional[Tensor],
                      super_summaries: Optional[Tensor] = None):
    """Decode selection as a (B, Hkv, n_pages) bool mask, plus the list width."""
    B, Hq, _, D = q.shape
    _, Hkv, Tkv, _ = k.shape
    P = pol.page_size
    n_pages = _ceil_div(Tkv, P)
    L = _valid_lengths(cache_seqlens, B, Tkv, q.device)
    page = torch.arange(n_pages, device=q.device)
    page_start = page * P
    # (B, 1, n_pages): the page holds at least one token < L
    valid = (page_start.view(1, -1) < L.view(B, 1)).unsqueeze(1)

    if dense:
        return valid.expand(B, Hkv, n_pages), n_pages

    budget = pol.budget_tokens
    n_sel = pol.n_sel

    if summaries is None:
        summaries = page_summaries(k, page_size=P, cache_seqlens=cache_seqlens)
    else:
        expected = (B, Hkv, n_pages, 2, D)
        if not isinstance(summaries, Tensor) or tuple(summaries.shape) != expected:
            got = tuple(summaries.shape) if isinstance(summaries, Tensor) else type(summaries).__name__
            raise ValueError(f"hydra: page_summaries must have shape {expected} for k and "
                             f"page_size={P}, got {got}")
        if summaries.device != q.device:
            raise ValueError(f"hydra: page_summaries must be on q's device ({q.device}), "
                             f"got {summaries.device}")

    # Sink pages: 0 .. ceil(sink_tokens / P) - 1.
    sink = (page < pol.sink_pages).view(1, 1, -1) & valid
    # Recent pages: every page holding a token in [max(0, L - recent), L).
    lo = (L - pol.recent_tokens).clamp(min=0).view(B, 1, 1)
    hi = L.view(B, 1, 1)
    p_lo = page_start.view(1, 1, -1)
    recent = torch.maximum(p_lo, lo) < torch.minimum(p_lo + P, hi)
    forced = sink | recent  # (B, 1, n_pages)

    scores = page_scores(q, summaries, cache_seqlens=cache_seqlens, page_size=P)
    candidates = valid & ~forced
    if pol.coarse:  # only pages of shortlisted superpages stay candidates
        S = pol.superpage
        if super_summaries is None:
            super_summaries = superpage_summaries(summaries, S)
        else:
            expected = (B, Hkv, _ceil_div(n_pages, S), 2, D)
            if not isinstance(super_summaries, Tensor) or tuple(super_summaries.shape) != expected:
                got = tuple(super_summaries.shape) if isinstance(super_summaries, Tensor) else \
                    type(super_summaries).__name__
                raise ValueError(f"hydra: superpage_summaries must have shape {expected}, got {got}")
        candidates = candidates & _shortlist_mask(q, pol, candidates, super_summaries, cache_seqlens, n_pages)
    k_top = (n_sel - forced.sum(dim=-1)).clamp(min=0).expand(B, Hkv)
    chosen = _top_k_mask(scores, candidates, k_top)
    selected = forced | chosen

    # Rows with L <= budget attend to every valid page.
    under_budget = (L <= budget).view(B, 1, 1)
    selected = torch.where(under_budget, valid, selected)
    return selected.expand(B, Hkv, n_pages), n_sel


def select_pages(q: Tensor, k: Tensor, *, is_causal: bool = True, sliding_window: Optional[int] = None,
                 policy_layer_idx: Optional[int] = None, precision: str = "high",
                 policy: Optional[HydraPolicy] = None, cache_seqlens: Optional[Tensor] = None,
                 page_summaries: Optional[Tensor] = None, superpage_summaries: Optional[Tensor] = None,
                 cache_leftpad: Optional[Tensor] = None) -> Tensor:
    """Decode page selection (SPEC 2, Tq == 1).

    Per sequence ``b`` and KV head ``h`` with valid length ``L``: when
    ``L <= budget_tokens`` every page ``0 .. ceil(L/P) - 1``; otherwise the union
    of the sink pages, the recent pages (those holding a token in
    ``[L - recent_tokens, L)``) and the ``n_sel - |sink U recent|`` remaining
    pages with the highest :func:`page_scores`, ties to the lower page index.
    With ``policy.superpage > 1`` (coarse-to-fine) those pages are taken only from
    the ``policy.n_short`` superpages with the highest scores among the superpages
    holding a candidate page (superpage ties to the lower index).

    Parameters
    ----------
    q : Tensor, (B, Hq, 1, D)
    k : Tensor, (B, Hkv, Tkv, D)
    is_causal : bool
        Must be True.
    sliding_window : int, optional
        Must be None: selection does not apply to sliding-window layers.
    policy_layer_idx : int, optional
        Layers below ``policy.dense_layers`` select every valid page.
    precision : str
        Preset name: "exact", "high", "balanced" or "fast".
    policy : HydraPolicy, optional
        Field-by-field overrides of the preset (see ``resolve_policy``).
    cache_seqlens : Tensor, (B,), optional
        Valid lengths ``L_b``.
    page_summaries : Tensor, (B, Hkv, ceil(Tkv/P), 2, D), optional
        Cached summaries; computed from ``k`` when None.
    superpage_summaries : Tensor, (B, Hkv, ceil(n_pages/superpage), 2, D), optional
        Coarse-to-fine only: cached :func:`superpage_summaries`; computed from the
        page summaries when None.
    cache_leftpad : Tensor, (B,), optional
        First valid positions; the returned pages count from them.

    Returns
    -------
    Tensor, (B, Hkv, n_sel), int32
        Ascending page indices padded with -1 at the end.
        ``n_sel = budget_tokens // P``, or ``ceil(Tkv/P)`` in the exact cases
        known from the arguments (precision "exact", budget None, or a dense layer).

    Examples
    --------
    >>> q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 9000, 64)
    >>> select_pages(q, k).shape   # budget 4096, pages of 16
    torch.Size([1, 2, 256])
    """
    if is_causal is not True:
        raise ValueError(f"hydra: is_causal must be True (only causal attention is supported), got {is_causal!r}")
    _check_sliding_window(sliding_window)
    if sliding_window is not None:
        raise ValueError(f"hydra: select_pages does not apply to sliding-window layers, got "
                         f"sliding_window={sliding_window}")
    _check_layer_idx(policy_layer_idx)
    _check_qk(q, k)
    _check_decode_q(q, "select_pages")
    pol = resolve_policy(precision, policy)
    k, cache_seqlens = _drop_left_padding(cache_leftpad, cache_seqlens, k.shape[0], k.shape[2], q.device, k)
    mask, width = _decode_page_mask(q, k, pol, _is_dense(pol, policy_layer_idx), cache_seqlens,
                                    page_summaries, superpage_summaries)
    return _mask_to_page_list(mask, width)


def attended_token_mask(q: Tensor, k: Tensor, *, is_causal: bool = True, sliding_window: Optional[int] = None,
                        policy_layer_idx: Optional[int] = None, precision: str = "high",
                        policy: Optional[HydraPolicy] = None, cache_seqlens: Optional[Tensor] = None,
                        page_summaries: Optional[Tensor] = None,
                        superpage_summaries: Optional[Tensor] = None,
                        cache_leftpad: Optional[Tensor] = None) -> Tensor:
    """The set of tokens a decode step attends to (SPEC 2.5 and 2.6).

    Parameters
    ----------
    q, k, and the keyword arguments
        As in :func:`select_pages`, except that ``sliding_window=W`` is allowed:
        it gives exactly the tokens in ``[max(0, L - W), L)``, with no selection.

    Returns
    -------
    Tensor, (B, Hkv, Tkv), bool
        The tokens ``< L`` of the selected pages, or the window, at their positions in
        ``k`` (with ``cache_leftpad``, shifted back past the padding).

    Examples
    --------
    >>> q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 100, 64)
    >>> attended_token_mask(q, k, sliding_window=10).sum(-1)
    tensor([[10, 10]])
    """
    if is_causal is not True:
        raise ValueError(f"hydra: is_causal must be True (only causal attention is supported), got {is_causal!r}")
    _check_sliding_window(sliding_window)
    _check_layer_idx(policy_layer_idx)
    _check_qk(q, k)
    _check_decode_q(q, "attended_token_mask")
    pol = resolve_policy(precision, policy)
    B, Hkv, Tkv, _ = k.shape
    if cache_leftpad is not None:  # select on the unpadded layout, then shift the mask back
        k_u, lens_u = _drop_left_padding(cache_leftpad, cache_seqlens, B, Tkv, q.device, k)
        m = attended_token_mask(q, k_u, sliding_window=sliding_window, policy_layer_idx=policy_layer_idx,
                                precision=precision, policy=policy, cache_seqlens=lens_u,
                                page_summaries=page_summaries, superpage_summaries=superpage_summaries)
        src = torch.arange(Tkv, device=q.device).view(1, Tkv) - cache_leftpad.to(q.device).long().view(B, 1)
        ok = (src >= 0).view(B, 1, Tkv)
        return ok & m.gather(2, src.clamp(min=0).view(B, 1, Tkv).expand(B, Hkv, Tkv))
    L = _valid_lengths(cache_seqlens, B, Tkv, q.device)
    pos = torch.arange(Tkv, device=q.device).view(1, 1, Tkv)
    if sliding_window is not None:
        start = (L - sliding_window).clamp(min=0).view(B, 1, 1)
        window = (pos >= start) & (pos < L.view(B, 1, 1))
        return window.expand(B, Hkv, Tkv)
    pages = select_pages(q, k, policy_layer_idx=policy_layer_idx, precision=precision, policy=policy,
                         cache_seqlens=cache_seqlens, page_summaries=page_summaries,
                         superpage_summaries=superpage_summaries)
    return _page_list_to_token_mask(pages, _ceil_div(Tkv, pol.page_size), pol.page_size, Tkv, L)


def attention_with_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: Optional[float] = None,
                        return_lse: bool = False, out_dtype: Optional[torch.dtype] = None):
    """Softmax attention in fp32 over the keys a boolean mask allows.

    Parameters
    ----------
    q : Tensor, (B, Hq, Tq, D)
    k, v : Tensor, (B, Hkv, Tkv, D)
    mask : Tensor, bool, broadcastable to (B, Hkv, Tq, Tkv)
        True where query ``t`` of KV head ``h``'s group may attend key ``s``.
        It is shared by the ``G = Hq // Hkv`` query heads of the group.
        Keys masked for every query never touch the result, even if NaN.
    scale : float, optional
        Score scale, default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the natural-log sum-exp of the scaled scores.
    out_dtype : torch.dtype, optional
        Output dtype; fp32 when None.

    Returns
    -------
    out : Tensor, (B, Hq, Tq, D)
        Rows with no allowed key are 0.
    lse : Tensor, (B, Hq, Tq), fp32, only with ``return_lse``
        -inf for rows with no allowed key.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 4, 3, 32), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    >>> attention_with_mask(q, k, v, torch.ones(5, dtype=torch.bool)).shape
    torch.Size([1, 4, 3, 32])
    """
    _check_scale(scale)
    B, Hq, Tq, D = q.shape
    _, Hkv, Tkv, Dv = v.shape
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    mask = mask.to(device=q.device, dtype=torch.bool).expand(B, Hkv, Tq, Tkv)
    used = mask.any(dim=2).unsqueeze(-1)  # (B, Hkv, Tkv, 1): keys some query attends
    zero = torch.zeros((), device=q.device)
    kf = torch.where(used, k.float(), zero)
    vf = torch.where(used, v.float(), zero)  # 0 * NaN would otherwise poison p @ v
    qf = q.float().view(B, Hkv, G, Tq, D)

    s = torch.matmul(qf, kf.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, G, Tq, Tkv)
    s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), zero, m)  # empty rows: keep exp() at 0, not NaN
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vf.unsqueeze(2))
    out = torch.where(denom > 0, out / denom.clamp(min=torch.finfo(torch.float32).tiny), zero)
    out = out.reshape(B, Hq, Tq, Dv)
    if out_dtype is not None:
        out = out.to(out_dtype)
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).reshape(B, Hq, Tq)
    return out, lse


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, pages: Tensor, *, cache_seqlens: Optional[Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False, page_size: int = 16,
                     cache_leftpad: Optional[Tensor] = None):
    """Decode attention over listed pages.

    Each query head attends to the tokens ``< L_b`` of the pages listed for its
    KV head. Entries of -1 are ignored and a page listed twice is attended once.

    Parameters
    ----------
    q : Tensor, (B, Hq, 1, D)
    k, v : Tensor, (B, Hkv, Tkv, D)
    pages : Tensor, (B, Hkv, n), integer (int32 for the kernels)
        Page indices in ``[0, ceil(Tkv/P))`` or -1, in any order.
    cache_seqlens : Tensor, (B,), optional
        Valid lengths ``L_b``.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the log-sum-exp over the attended set.
    page_size : int
        Tokens per page ``P``.
    cache_leftpad : Tensor, (B,), optional
        First valid positions; page indices count from them.

    Returns
    -------
    out : Tensor, (B, Hq, 1, D), q's dtype (computed in fp32)
    lse : Tensor, (B, Hq, 1), fp32, only with ``return_lse``
        Natural log; -inf (and out 0) when nothing valid is listed.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
    >>> pages = torch.tensor([[[0, 3, -1], [1, 1, 2]]], dtype=torch.int32)
    >>> sparse_attention(q, k, v, pages).shape
    torch.Size([1, 4, 1, 64])
    """
    _check_qk(q, k)
    _check_v(q, k, v)
    _check_decode_q(q, "sparse_attention")
    _check_scale(scale)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"hydra: page_size must be a positive int, got {page_size!r}")
    B, Hkv, Tkv, _ = k.shape
    if not isinstance(pages, Tensor):
        raise TypeError(f"hydra: pages must be an int32 tensor, got {type(pages).__name__}")
    if pages.is_floating_point() or pages.is_complex() or pages.dtype == torch.bool:
        raise TypeError(f"hydra: pages must be an int32 tensor, got {pages.dtype}")
    if pages.dim() != 3 or tuple(pages.shape[:2]) != (B, Hkv):
        raise ValueError(f"hydra: pages must have shape ({B}, {Hkv}, n), got {tuple(pages.shape)}")
    if pages.device != q.device:
        raise ValueError(f"hydra: pages must be on q's device ({q.device}), got {pages.device}")
    n_pages = _ceil_div(Tkv, page_size)
    if pages.numel():
        lo, hi = int(pages.min()), int(pages.max())
        if lo < -1 or hi >= n_pages:
            raise ValueError(f"hydra: pages entries must be -1 or in [0, {n_pages}), got min {lo}, max {hi}")
    k, v, cache_seqlens = _drop_left_padding(cache_leftpad, cache_seqlens, B, Tkv, q.device, k, v)
    L = _valid_lengths(cache_seqlens, B, Tkv, q.device)
    mask = _page_list_to_token_mask(pages, n_pages, page_size, Tkv, L)
    return attention_with_mask(q, k, v, mask.unsqueeze(2), scale=scale, return_lse=return_lse,
                               out_dtype=q.dtype)


def prefill_block_mask(q: Tensor, k: Tensor, *, policy: HydraPolicy) -> Tensor:
    """Block-level prefill selection (SPEC 2, "Prefill selection").

    Queries are bottom-right aligned: with ``Tq <= Tkv``, query ``t`` sits at key position
    ``Tkv - Tq + t`` (``Tq == Tkv`` is a plain causal prefill; ``Tq < Tkv`` a chunk after
    earlier tokens, or speculative verification). Query blocks cover ``bs =
    policy.block_size`` queries (the last may be partial) and key blocks ``bs`` keys.
    Query block ``i``, whose last query sits in key block ``d``, attends to

    * the sink blocks ``0 .. ceil(sink_tokens / bs) - 1`` that are ``<= d``;
    * the local blocks ``max(0, d - recent_tokens // bs) .. d``;
    * the ``budget_tokens // bs - |sink U local|`` highest-scoring remaining
      blocks ``< d`` (none if that count is <= 0), ties to the lower index.

    A block's score is the Quest bound of :func:`page_scores` with the block's
    mean query (per query head, over its queries) against the key block's
    min/max (over its keys), summed over the GQA group. When ``Tkv <= budget_tokens``
    (or the policy is exact) every block ``<= d`` is attended. Memory is O(nbq * nbk).

    Parameters
    ----------
    q : Tensor, (B, Hq, Tq, D)
    k : Tensor, (B, Hkv, Tkv, D), ``Tkv >= Tq``
    policy : HydraPolicy
        A resolved policy (see ``resolve_policy``).

    Returns
    -------
    Tensor, (B, Hkv, nbq, nbk), bool
        ``[b, h, i, j]`` is True when query block ``i`` attends key block ``j``.
        The attention masks the blocks it attends token-causally.

    Examples
    --------
    >>> q, k = torch.randn(1, 4, 256, 32), torch.randn(1, 2, 256, 32)
    >>> prefill_block_mask(q, k, policy=HydraPolicy()).shape
    torch.Size([1, 2, 4, 4])
    """
    _check_qk(q, k)
    if not isinstance(policy, HydraPolicy):
        raise TypeError(f"hydra: policy must be a hydra.HydraPolicy, got {type(policy).__name__}")
    B, Hq, Tq, D = q.shape
    Hkv, Tkv = k.shape[1], k.shape[2]
    if Tq > Tkv:
        raise ValueError(f"hydra: prefill needs Tq <= Tkv, got Tq={Tq}, Tkv={Tkv}")
    bs = policy.block_size
    off = Tkv - Tq
    nbq, nbk = _ceil_div(Tq, bs), _ceil_div(Tkv, bs)
    blk = torch.arange(nbk, device=q.device)
    last = torch.clamp(torch.arange(nbq, device=q.device) * bs + bs, max=Tq) - 1  # each block's last query
    diag = (off + last) // bs  # (nbq,) key block of that query
    causal = blk.view(1, nbk) <= diag.view(nbq, 1)  # [i, j]: j <= d_i
    if policy.exact or Tkv <= policy.budget_tokens:
        return causal.expand(B, Hkv, nbq, nbk).clone()

    G = Hq // Hkv
    n_budget = policy.budget_tokens // bs
    sink_blocks = _ceil_div(policy.sink_tokens, bs)
    local_back = policy.recent_tokens // bs

    pad = nbq * bs - Tq  # the last query block's missing queries
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(B, Hkv, G, nbq, bs, D)
    counts = torch.full((nbq,), bs, dtype=torch.float32, device=q.device)
    counts[-1] = bs - pad
    q_mean = qf.sum(dim=4) / counts.view(1, 1, 1, nbq, 1)  # (B, Hkv, G, nbq, D), over the block's queries
    block_summaries = page_summaries(k, page_size=bs)  # (B, Hkv, nbk, 2, D), over the block's keys

    mask = torch.zeros((B, Hkv, nbq, nbk), dtype=torch.bool, device=q.device)
    for i in range(nbq):
        d = int(diag[i])
        sink = blk < sink_blocks
        local = blk >= d - local_back
        forced = (sink | local) & (blk <= d)
        candidates = (blk < d) & ~forced
        k_top = max(0, n_budget - int(forced.sum()))
        scores = _quest_bound(q_mean[:, :, :, i], block_summaries)  # (B, Hkv, nbk)
        chosen = _top_k_mask(scores, candidates.view(1, 1, nbk), k_top)
        mask[:, :, i] = forced.view(1, 1, nbk) | chosen
    return mask


def _prefill(q: Tensor, k: Tensor, v: Tensor, pol: HydraPolicy, dense: bool, sliding_window: Optional[int],
             scale: Optional[float], return_lse: bool):
    """Causal prefill (queries bottom-right aligned), one query block at a time so memory
    stays O(bs * Tkv)."""
    B, Hq, Tq, D = q.shape
    Tkv = k.shape[2]
    bs = pol.block_size
    off = Tkv - Tq
    if sliding_window is None and not dense:
        block_mask = prefill_block_mask(q, k, policy=pol)
    else:
        block_mask = None  # exact causal or windowed: no selection

    outs, lses = [], []
    for i in range(_ceil_div(Tq, bs)):
        hi = min((i + 1) * bs, Tq)
        q_pos = off + torch.arange(i * bs, hi, device=q.device).view(-1, 1)
        n_keys = off + hi  # keys past the block's last query are never attended
        k_pos = torch.arange(n_keys, device=q.device).view(1, n_keys)
        tok = k_pos <= q_pos  # (rows, n_keys) token-level causal
        if sliding_window is not None:
            tok = tok & (k_pos > q_pos - sliding_window)
        mask = tok.view(1, 1, hi - i * bs, n_keys)
        if block_mask is not None:
            key_blocks = block_mask[:, :, i, torch.arange(n_keys, device=q.device) // bs]  # (B, Hkv, n_keys)
            mask = mask & key_blocks.unsqueeze(2)
        res = attention_with_mask(q[:, :, i * bs:hi], k[:, :, :n_keys], v[:, :, :n_keys], mask,
                                  scale=scale, return_lse=return_lse)
        if return_lse:
            outs.append(res[0])
            lses.append(res[1])
        else:
            outs.append(res)
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def hydra(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = True, sliding_window: Optional[int] = None,
          policy_layer_idx: Optional[int] = None, precision: str = "high", policy: Optional[HydraPolicy] = None,
          cache_seqlens: Optional[Tensor] = None, page_summaries: Optional[Tensor] = None,
          scale: Optional[float] = None, return_lse: bool = False, out: Optional[Tensor] = None,
          superpage_summaries: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None):
    """The whole hydra contract in PyTorch (SPEC sections 1-3).

    Parameters
    ----------
    q : Tensor, (B, Hq, Tq, D)
    k, v : Tensor, (B, Hkv, Tkv, D)
        ``Hq % Hkv == 0``; same dtype and device as q.
    is_causal : bool
        Must be True.
    sliding_window : int, optional
        Marks a sliding-window layer: decode attends to ``[L - W, L)``,
        prefill query ``i`` to ``[i - W + 1, i]``, with no selection.
    policy_layer_idx : int, optional
        Layers below ``policy.dense_layers`` attend densely.
    precision : str
        "exact", "high" (default), "balanced" or "fast".
    policy : HydraPolicy, optional
        Field-by-field overrides of the preset.
    cache_seqlens : Tensor, (B,), optional
        Decode only: valid lengths ``L_b`` in ``[1, Tkv]``.
    page_summaries : Tensor, (B, Hkv, ceil(Tkv/P), 2, D), optional
        Decode only: cached page summaries; ignored by prefill, whose
        selection uses block summaries of its own keys.
    superpage_summaries : Tensor, optional
        Decode with ``policy.superpage > 1`` only: cached :func:`superpage_summaries`.
    cache_leftpad : Tensor, (B,), optional
        Decode only: first valid positions (left padding); see the module notes.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the fp32 natural-log sum-exp ``(B, Hq, Tq)``.
    out : Tensor, (B, Hq, Tq, D), optional
        Written in place and returned.

    Returns
    -------
    out : Tensor, (B, Hq, Tq, D), q's dtype
    lse : Tensor, (B, Hq, Tq), fp32, only with ``return_lse``

    Paths
    -----
    * ``Tq == 1``: decode over :func:`attended_token_mask`.
    * ``1 < Tq <= Tkv``: causal prefill, queries bottom-right aligned (``Tq < Tkv``: a
      chunk after earlier tokens, or speculative verification), any lengths. Query
      block ``i`` attends the blocks of :func:`prefill_block_mask`, token-causally.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 5000, 64), torch.randn(1, 2, 5000, 64)
    >>> hydra(q, k, v).shape
    torch.Size([1, 8, 1, 64])
    """
    if is_causal is not True:
        raise ValueError(f"hydra: is_causal must be True (only causal attention is supported), got {is_causal!r}")
    _check_qk(q, k)
    _check_v(q, k, v)
    _check_sliding_window(sliding_window)
    _check_layer_idx(policy_layer_idx)
    _check_scale(scale)
    pol = resolve_policy(precision, policy)
    B, Hq, Tq, D = q.shape
    Tkv = k.shape[2]

    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"hydra: out must be a tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (B, Hq, Tq, D):
            raise ValueError(f"hydra: out must have shape {(B, Hq, Tq, D)}, got {tuple(out.shape)}")
        if out.dtype != q.dtype:
            raise TypeError(f"hydra: out must be {q.dtype} like q, got {out.dtype}")
        if out.device != q.device:
            raise ValueError(f"hydra: out must be on q's device ({q.device}), got {out.device}")

    if cache_leftpad is not None and Tq != 1:
        raise ValueError(f"hydra: cache_leftpad is decode-only (Tq == 1), got Tq={Tq}")
    if Tq == 1:
        k, v, cache_seqlens = _drop_left_padding(cache_leftpad, cache_seqlens, B, Tkv, q.device, k, v)
        mask = attended_token_mask(q, k, sliding_window=sliding_window, policy_layer_idx=policy_layer_idx,
                                   precision=precision, policy=policy, cache_seqlens=cache_seqlens,
                                   page_summaries=page_summaries, superpage_summaries=superpage_summaries)
        res = attention_with_mask(q, k, v, mask.unsqueeze(2), scale=scale, return_lse=return_lse)
    elif Tq <= Tkv:
        if cache_seqlens is not None:
            raise ValueError("hydra: cache_seqlens is decode-only (Tq == 1), got it with prefill "
                             f"Tq={Tq}, Tkv={Tkv}")
        res = _prefill(q, k, v, pol, _is_dense(pol, policy_layer_idx), sliding_window, scale, return_lse)
    else:
        raise ValueError(f"hydra: Tq must be at most Tkv (queries are the last Tq positions), got Tq={Tq}, "
                         f"Tkv={Tkv}")

    o, lse = res if return_lse else (res, None)
    if out is not None:
        out.copy_(o)
        o = out
    else:
        o = o.to(q.dtype)
    return (o, lse) if return_lse else o
