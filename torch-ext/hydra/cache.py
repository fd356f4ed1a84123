"""HydraKVCache: a preallocated decode cache whose page summaries stay current.

A decode step with cached summaries reads only the summaries and the selected
pages; this cache keeps them up to date as tokens arrive, with one kernel launch
per ``append`` and no host sync, so a whole step (append + attend per layer) can
be captured in one CUDA graph.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from ._ops import ops
from ._validate import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, _ALIGN, _tensor
from .policy import HydraPolicy, resolve_policy

__all__ = ["HydraKVCache"]


# Views grow in steps of this many pages (1,024 tokens at 16-token pages), so a step
# reuses the same views for that many tokens.
_VIEW_PAGES = 64


def _capturing(t: torch.Tensor) -> bool:
    """A CUDA graph being captured on the current stream, or torch.compile tracing."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _positive_int(x, name):
    if not isinstance(x, int) or isinstance(x, bool) or x < 1:
        raise ValueError(f"hydra: HydraKVCache {name} must be a positive int, got {x!r}")


class HydraKVCache:
    """One attention layer's KV cache with incrementally maintained page summaries.

    Parameters
    ----------
    batch_size, num_kv_heads, head_dim, max_seq_len : int
        Buffers are ``k``, ``v`` (B, Hkv, max_seq_len, D) and ``summaries``
        (B, Hkv, ceil(max_seq_len / page_size), 2, D), allocated once; with a
        coarse-to-fine policy (``superpage > 1``) also ``superpage_summaries``
        (B, Hkv, ceil(max_pages / superpage), 2, D), maintained the same way.
    dtype : torch.dtype, bf16 or fp16.
    device : CUDA device.
    policy, precision : as in :func:`hydra.hydra`; fix the page size of the summaries
        and are the defaults of :meth:`attend`. ``HydraPolicy(summary_dtype="fp8_e4m3")``
        stores the summaries as e4m3 codes of ``k * summary_scale`` rounded outward
        (``torch.float8_e4m3fn``): half the bytes a decode step reads for scoring, and
        half the summary memory.

    Examples
    --------
    >>> cache = hydra.HydraKVCache(B, Hkv, 128, 65536, dtype=torch.bfloat16, device="cuda")
    >>> cache.prefill(k_prompt, v_prompt)                    # (B, Hkv, T, 128)
    >>> for _ in range(steps):
    ...     out = cache.step(q, k_new, v_new)                # append + attend, fused
    ...     # or: cache.append(k_new, v_new); out = cache.attend(q)

    Notes
    -----
    Lengths live on the device (:attr:`seqlens`). An ``append`` past ``max_seq_len``
    is refused with a ``ValueError`` before any kernel runs when the host knows every
    length (uniform prefill and appends, no ``counts``); otherwise, and during CUDA-graph
    replay where the host sees nothing, the kernel drops the tokens that do not fit and
    raises a device flag that :meth:`check_overflow` reports (automatically after each
    ``append`` in debug mode, ``hydra.set_debug(True)``).
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, max_seq_len, *, dtype=torch.bfloat16, device="cuda",
                 policy: Optional[HydraPolicy] = None, precision: str = "high"):
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_seq_len", max_seq_len)):
            _positive_int(value, name)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"hydra: HydraKVCache dtype must be bf16 or fp16, got {dtype}")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"hydra: HydraKVCache head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"hydra: HydraKVCache needs a CUDA device, got {device}")
        self.policy = resolve_policy(precision, policy)
        self.precision, self._policy_arg = precision, policy
        B, H, D, P = batch_size, num_kv_heads, head_dim, self.policy.page_size
        self.max_seq_len = max_seq_len
        self.max_pages = math.ceil(max_seq_len / P)
        self.k = torch.empty(B, H, max_seq_len, D, dtype=dtype, device=device)
        self.v = torch.empty(B, H, max_seq_len, D, dtype=dtype, device=device)
        sdtype = self.policy.summary_torch_dtype or dtype
        self.summary_scale = float(self.policy.summary_scale)
        self._default_scale = 1.0 / math.sqrt(D)  # step()'s softmax scale when none is given
        self.summaries = torch.empty(B, H, self.max_pages, 2, D, dtype=sdtype, device=device)
        # Coarse-to-fine policies (superpage > 1) keep superpage summaries too.
        self.superpage_summaries = None
        if self.policy.coarse:
            n_super = math.ceil(self.max_pages / self.policy.superpage)
            self.superpage_summaries = torch.empty(B, H, n_super, 2, D, dtype=sdtype, device=device)
        self._lengths = torch.zeros(B, dtype=torch.int32, device=device)
        self._overflow = torch.zeros(1, dtype=torch.int32, device=device)
        self._len_bound = 0        # host upper bound of every length
        self._len_exact = True     # ... and exact: every length equals it
        self._bound_known = True   # False once a write ran under graph capture or compile (see _operands)
        self._views = None         # (T, k, v, summaries, superpage summaries) over the first T tokens
        self._capture_tokens = None  # capture_tokens(): what captured steps read
        self.reset()

    # -- state -------------------------------------------------------------------
    @property
    def seqlens(self) -> torch.Tensor:
        """int32 (B,) valid lengths, on the device (pass as ``cache_seqlens``)."""
        return self._lengths

    def memory_bytes(self) -> int:
        """Bytes held on the device: K, V, summaries, lengths and the overflow flag."""
        held = [self.k, self.v, self.summaries, self._lengths, self._overflow]
        if self.superpage_summaries is not None:
            held.append(self.superpage_summaries)
        return sum(t.numel() * t.element_size() for t in held)

    def reset(self, indices=None) -> None:
        """Empty every sequence, or those in ``indices`` (ints or a tensor of indices)."""
        # Empty summaries: +inf / -inf (e4m3 has no infinities: 448 / -448, see hydra.reference).
        inf = 448.0 if self.summaries.dtype == torch.float8_e4m3fn else float("inf")
        levels = [self.summaries] + ([self.superpage_summaries] if self.superpage_summaries is not None else [])
        if indices is None:
            self._lengths.zero_()
            for s in levels:
                s[:, :, :, 0].fill_(inf)
                s[:, :, :, 1].fill_(-inf)
            self._overflow.zero_()
            self._len_bound, self._len_exact = 0, True
            self._views = None
            self._bound_known = not _capturing(self._lengths)
            return
        idx = torch.as_tensor(indices, dtype=torch.long, device=self._lengths.device).reshape(-1)
        self._lengths[idx] = 0
        for s in levels:
            s[idx, :, :, 0] = inf
            s[idx, :, :, 1] = -inf
        self._len_exact = False  # the bound still holds, for the rest
        if _capturing(self._lengths):
            self._bound_known = False

    def check_overflow(self) -> None:
        """Raise if an append has passed ``max_seq_len`` since the last reset (host sync)."""
        if int(self._overflow.item()):
            raise ValueError(f"hydra: an append passed max_seq_len={self.max_seq_len}; the tokens that did "
                             "not fit were dropped")

    # -- writes ------------------------------------------------------------------
    def _check_new(self, k, v, name_k, name_v):
        B, H, _, D = self.k.shape
        for name, t in ((name_k, k), (name_v, v)):
            _tensor(t, name)
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D or t.shape[2] < 1:
                raise ValueError(f"hydra: {name} must be ({B}, {H}, n >= 1, {D}), got {tuple(t.shape)}")
            if t.dtype != self.k.dtype:
                raise TypeError(f"hydra: {name} must be {self.k.dtype} like the cache, got {t.dtype}")
            if t.stride(-1) != 1 or any(s % _ALIGN for s in t.stride()[:-1]):
                raise ValueError(f"hydra: {name} needs a contiguous last dimension and 16-byte aligned strides, "
                                 f"got strides {t.stride()}")
            if t.device != self.k.device:
                raise ValueError(f"hydra: {name} must be on the cache's device {self.k.device}, got {t.device}")
        if v.shape != k.shape:
            raise ValueError(f"hydra: {name_v} must have {name_k}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")

    def _check_step_inputs(self, k_new, v_new):
        """step()'s checks of the new token (one per sequence)."""
        self._check_new(k_new, v_new, "k_new", "v_new")
        if k_new.shape[2] != 1:
            raise ValueError(f"hydra: HydraKVCache.step appends one token per sequence: k_new must be "
                             f"({self.k.shape[0]}, {self.k.shape[1]}, 1, {self.k.shape[3]}), got "
                             f"{tuple(k_new.shape)}; use append() for more")

    def _check_counts(self, counts, name):
        if counts is None:
            return
        _tensor(counts, name)
        if counts.dtype != torch.int32 or tuple(counts.shape) != (self.k.shape[0],) or not counts.is_contiguous():
            raise ValueError(f"hydra: {name} must be a contiguous int32 tensor of shape ({self.k.shape[0]},), "
                             f"got {counts.dtype} {tuple(counts.shape)}")
        if counts.device != self.k.device:
            raise ValueError(f"hydra: {name} must be on the cache's device {self.k.device}, got {counts.device}")

    def prefill(self, k, v, seqlens=None) -> None:
        """Write a prompt's K/V (B, Hkv, T, D) and build every page summary, in one pass.

        ``seqlens`` (int32 (B,), on the device) gives ragged prompt lengths ``<= T``;
        positions past them are not copied. Replaces what the cache held.
        """
        self._check_new(k, v, "k", "v")
        self._check_counts(seqlens, "seqlens")
        T = k.shape[2]
        if T > self.max_seq_len:
            raise ValueError(f"hydra: prefill of T={T} tokens does not fit max_seq_len={self.max_seq_len}")
        self._overflow.zero_()
        ops.cache_prefill(k, v, seqlens, self.policy.page_size, self.k, self.v, self.summaries, self._lengths,
                          self._overflow, self.summary_scale)
        if self.superpage_summaries is not None:  # exact: min/max over the pages' min/max
            from .reference import superpage_summaries

            self.superpage_summaries.copy_(superpage_summaries(self.summaries, self.policy.superpage))
        self._len_bound, self._len_exact = T, seqlens is None
        self._views = None
        self._bound_known = not _capturing(self._lengths)

    def append(self, k_new, v_new, counts=None) -> None:
        """Write new tokens (B, Hkv, n, D) after each sequence's end and fold them into
        the affected page summaries, in one launch with no host sync.

        ``counts`` (int32 (B,), on the device): how many of the n new tokens each
        sequence takes (ragged appends); default all n.
        """
        self._check_new(k_new, v_new, "k_new", "v_new")
        self._check_counts(counts, "counts")
        n = k_new.shape[2]
        if self._len_exact and counts is None and self._len_bound + n > self.max_seq_len:
            raise ValueError(f"hydra: appending {n} token(s) to sequences of {self._len_bound} would pass "
                             f"max_seq_len={self.max_seq_len}")
        ops.cache_append(k_new, v_new, counts, self.policy.page_size, self.k, self.v, self.summaries,
                         self.superpage_summaries, self.policy.superpage, self._lengths, self._overflow,
                         self.summary_scale)
        self._len_bound += n
        self._len_exact = self._len_exact and counts is None
        if _capturing(self._lengths):
            self._bound_known = False
        from . import _debug_enabled

        if _debug_enabled():
            self.check_overflow()

    # -- the tensors a step reads ----------------------------------------------------
    def _operands(self, n_new: int):
        """(k, v, summaries, superpage summaries) for a step that first appends ``n_new``
        tokens: views over the first T tokens of the buffers, where T covers every length
        the host knows the sequences may reach (``_len_bound + n_new``) rounded up to
        _VIEW_PAGES pages, or the whole buffers. The kernels size their grids and pick
        their paths (the fused short step, the register select, the cluster) from T, so
        an eager step over a cache far longer than its sequences costs what a cache of
        about their length would. Under CUDA-graph capture or torch.compile the whole
        buffers are used (or the first tokens capture_tokens() names), since a replay
        runs past any bound the host saw; and the bound
        is then unknown (the replays grow the lengths without the host) until the next
        full reset() or prefill(). The lengths must change only through this cache's
        methods: a length written into ``seqlens`` by hand past the bound is not read."""
        if _capturing(self._lengths):
            self._bound_known = False
            if self._capture_tokens is not None:  # capture_tokens(): the caller's bound
                return self._views_over(self._capture_tokens)[1:]
        if not self._bound_known:
            return self.k, self.v, self.summaries, self.superpage_summaries
        need = min(self._len_bound + n_new, self.max_seq_len)
        if self._views is None or need > self._views[0]:
            step = self.policy.page_size * _VIEW_PAGES
            self._views = self._views_over(-(-max(need, 1) // step) * step)
        return self._views[1:]

    def _views_over(self, tokens: int):
        """(T, k, v, summaries, superpage summaries) over the first T tokens: ``tokens``
        rounded up to a page, at most ``max_seq_len``."""
        P = self.policy.page_size
        n_pages = min(-(-tokens // P), self.max_pages)
        T = min(n_pages * P, self.max_seq_len)
        supers = None
        if self.superpage_summaries is not None:
            supers = self.superpage_summaries[:, :, :-(-n_pages // self.policy.superpage)]
        return T, self.k[:, :, :T], self.v[:, :, :T], self.summaries[:, :, :n_pages], supers

    @contextlib.contextmanager
    def capture_tokens(self, tokens: int):
        """Steps and attends captured into a CUDA graph (or traced by torch.compile) inside
        this block read the first ``tokens`` tokens of the buffers (rounded up to a page)
        instead of all ``max_seq_len``, so that a replay costs what a cache of that length
        would. A replay's append past them is dropped and flagged as one past
        ``max_seq_len`` is (:meth:`check_overflow`). So capture one graph per length
        bucket, and replay the one whose ``tokens`` covers every length after the replay's
        appends. Calls that are not captured are unaffected.

        Examples
        --------
        >>> g = torch.cuda.CUDAGraph()
        >>> with cache.capture_tokens(16384), torch.cuda.graph(g):
        ...     out = cache.step(q, k_new, v_new)
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= self.max_seq_len:
            raise ValueError(f"hydra: capture_tokens needs an int tokens in [1, max_seq_len={self.max_seq_len}], "
                             f"got {tokens!r}")
        held, self._capture_tokens = self._capture_tokens, tokens
        try:
            yield self
        finally:
            self._capture_tokens = held

    # -- a whole decode step ----------------------------------------------------------
    def step(self, q, k_new, v_new, **policy_kwargs):
        """Append one token per sequence (k_new, v_new: (B, Hkv, 1, D)) and attend q
        (B, Hq, 1, D) over the grown cache: ``append`` then ``attend``, fused.

        When the step selects pages (any selecting policy with ``max_seq_len`` above the
        budget) the append rides in the first score launch (one extra CTA per sequence
        and KV head), so a step costs what ``attend`` costs; otherwise (dense layers,
        sliding windows, exact precision, a cache no longer than the budget) it is one
        append launch plus the attention. Lengths advance on the device, with no host sync; keyword
        arguments are those of :meth:`attend`. Overflow is handled as in :meth:`append`.
        """
        from . import _STEP_FAST_ARGS, _cache_step, _debug_enabled, _fast_cache_step

        full = self._len_exact and self._len_bound + 1 > self.max_seq_len
        if not full and not _debug_enabled() and _STEP_FAST_ARGS.issuperset(policy_kwargs):
            # The common step: checked by the op in C++ (README, "The eager hot path").
            result = _fast_cache_step(self, q, k_new, v_new, **policy_kwargs)
            if result is not None:
                self._len_bound += 1
                return result if policy_kwargs.get("return_lse") else result[0]
        self._check_step_inputs(k_new, v_new)
        if full:
            raise ValueError(f"hydra: appending 1 token to sequences of {self._len_bound} would pass "
                             f"max_seq_len={self.max_seq_len}")
        policy_kwargs.setdefault("precision", self.precision)
        policy_kwargs.setdefault("policy", self._policy_arg)
        result = _cache_step(self, q, k_new, v_new, **policy_kwargs)
        self._len_bound += 1
        if _debug_enabled():
            self.check_overflow()
        return result

    # -- reads -------------------------------------------------------------------
    def attend(self, q, **policy_kwargs):
        """Decode attention of q (B, Hq, 1, D) over the cache, through :func:`hydra.hydra`.

        Keyword arguments go to :func:`hydra.hydra` (``policy_layer_idx``,
        ``return_lse``, ``out``, ``sliding_window``, ``scale``...); ``precision`` and
        ``policy`` default to the cache's.
        """
        from . import hydra as _hydra

        policy_kwargs.setdefault("precision", self.precision)
        policy_kwargs.setdefault("policy", self._policy_arg)
        k, v, summaries, supers = self._operands(0)
        if supers is not None:
            policy_kwargs.setdefault("superpage_summaries", supers)
        return _hydra(q, k, v, cache_seqlens=self._lengths, page_summaries=summaries, **policy_kwargs)
