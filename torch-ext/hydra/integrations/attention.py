"""``hydra_attention``: hydra behind transformers' attention-function signature.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``
after the layer's cache update, with q (B, Hq, S, D), k/v (B, Hkv, Tkv, D) and, for
flash-attention-style implementations (hydra registers as one), ``attention_mask``
None or the 2-D (B, W) padding mask of the W tokens written so far (True: a real token).
It returns (out (B, S, Hq, D), None).

Routing:
* a layer of :class:`hydra.integrations.transformers.HydraCache` (the keys carry a link
  to it): the prompt is attended densely, then copied into the layer's HydraKVCache
  with the padding cut off; each decode step attends through the cached page summaries;
* any other cache (DynamicCache, StaticCache): decode (S == 1) runs ``hydra.hydra`` on
  the cache's tensors, the padding passed as ``cache_leftpad``; pages are scored from K
  each step (no summaries are kept), which is correct but reads all of K;
* prompts (S > 1): a whole prompt longer than the budget runs hydra's sparse prefill
  kernel (CUDA, bf16/fp16, D = 64, 128 or 256, no sliding window); shorter prompts, chunks
  after a prompt and the rest run dense causal SDPA;
* without a CUDA device, decode runs ``hydra.reference`` (pure PyTorch), with a
  one-time warning; on CUDA, dtypes or head dims the kernels do not cover (fp32,
  D not in 64/128/256) fall back to dense SDPA, with a one-time warning.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from .._validate import PREFILL_HEAD_DIMS, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from ..policy import HydraPolicy, resolve_policy

__all__ = ["hydra_attention", "set_defaults"]

_DEFAULTS = {"precision": "high", "policy": None}
_NOTICED: set = set()
_PREFILL_CHUNK = 2048  # query rows per SDPA call when an explicit mask is needed


def set_defaults(precision: str = "high", policy: Optional[HydraPolicy] = None) -> None:
    """The precision/policy ``hydra_attention`` uses with caches that carry none
    (DynamicCache, StaticCache). A :class:`HydraCache` uses its own."""
    resolve_policy(precision, policy)  # validates both
    _DEFAULTS["precision"], _DEFAULTS["policy"] = precision, policy


def _notice(key: str, message: str) -> None:
    if key not in _NOTICED:
        _NOTICED.add(key)
        warnings.warn(message, stacklevel=3)


def _sliding_window(module, kwargs) -> Optional[int]:
    """The layer's window: the model passes it, the module holds it, or the config's
    ``layer_types`` marks the layer as sliding."""
    w = kwargs.get("sliding_window")
    if w is None:
        w = getattr(module, "sliding_window", None)
    if w is None:
        cfg = getattr(module, "config", None)
        types = getattr(cfg, "layer_types", None)
        idx = getattr(module, "layer_idx", None)
        if types is not None and idx is not None and idx < len(types) and types[idx] == "sliding_attention":
            w = getattr(cfg, "sliding_window", None)
    return int(w) if w else None


def _padding(attention_mask, B: int, Tkv: int, device):
    """(cache_seqlens, cache_leftpad) from the 2-D padding mask, or (None, None)."""
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"hydra: hydra_attention takes the 2-D (batch, tokens) padding mask that transformers builds "
                         f"for flash-attention-style implementations, got attention_mask of shape {shape}")
    W = attention_mask.shape[1]
    if attention_mask.shape[0] != B or W > Tkv:
        raise ValueError(f"hydra: attention_mask must be ({B}, <= {Tkv}) for keys of {Tkv} tokens, got "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    lens = torch.full((B,), W, dtype=torch.int32, device=device)
    pad = (W - mask.sum(-1)).to(torch.int32)
    return lens, pad


def check_left_padded(attention_mask) -> list:
    """Host check (a sync, prompts only): every row is False...False True...True with at
    least one True. Returns the pad counts."""
    mask = attention_mask.bool()
    W = mask.shape[1]
    pads = (W - mask.sum(-1)).tolist()
    expected = torch.arange(W, device=mask.device).view(1, W) >= torch.tensor(pads, device=mask.device).view(-1, 1)
    if not torch.equal(mask, expected) or max(pads) >= W:
        raise ValueError("hydra: hydra_attention supports left padding only (each attention_mask row is 0...0 1...1 "
                         f"with at least one 1, the transformers default for generation); got pad counts {pads} and "
                         "a mask that is not of that form. Use tokenizer.padding_side = 'left'.")
    return pads


def causal_sdpa(q, k, v, scale, window: Optional[int] = None):
    """Dense causal attention, queries bottom-right aligned: query i sits at position
    Lk - S + i. q (b, Hq, S, D), k/v (b, Hkv, Lk, D)."""
    S, Lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if window is None and S == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    outs = []
    for s0 in range(0, S, _PREFILL_CHUNK):
        s1 = min(S, s0 + _PREFILL_CHUNK)
        qpos = torch.arange(Lk - S + s0, Lk - S + s1, device=q.device).view(-1, 1)
        lo = 0 if window is None else max(0, Lk - S + s0 - window + 1)
        hi = Lk - S + s1
        kpos = torch.arange(lo, hi, device=q.device).view(1, -1)
        allowed = kpos <= qpos
        if window is not None:
            allowed = allowed & (kpos > qpos - window)
        outs.append(F.scaled_dot_product_attention(q[:, :, s0:s1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=allowed,
                                                   scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def _prefill_fits(q) -> bool:
    """The D = 256 prefill kernel needs ~139 KB of shared memory per block (A100, H100...)."""
    if q.shape[-1] <= 128:
        return True
    props = torch.cuda.get_device_properties(q.device)
    return getattr(props, "shared_memory_per_block_optin", 0) >= 2 * 2 * 64 * (256 + 8) * 2 + 4112


def _prompt_one(q, k, v, scale, window, layer_idx, precision, policy):
    """A whole prompt (S == Lk) longer than the budget runs hydra's sparse prefill kernel;
    shorter prompts, chunks after a prompt, windows and what the kernel does not cover run
    dense causal SDPA (which is exact there, and faster than the kernel's exact mode)."""
    if (window is None and q.shape[2] == k.shape[2] and kernels_cover(q, k) and q.shape[-1] in PREFILL_HEAD_DIMS
            and _prefill_fits(q)):
        pol = resolve_policy(precision, policy)
        dense = pol.exact or (layer_idx is not None and layer_idx < pol.dense_layers)
        if not dense and pol.block_size == 64 and pol.budget_tokens % 64 == 0 and k.shape[2] > pol.budget_tokens:
            from .. import hydra as _hydra

            return _hydra(q, k, v, policy_layer_idx=layer_idx, precision=precision, policy=policy, scale=scale)
    return causal_sdpa(q, k, v, scale, window)


def prompt_attention(query, key, value, attention_mask, scale, window, layer_idx=None, precision="high",
                     policy=None):
    """A prompt (or chunk) of S queries over the first W cached tokens, with the left padding
    cut off per sequence (rows of padding queries are zero)."""
    B, _, S, _ = query.shape
    W = key.shape[2] if attention_mask is None else attention_mask.shape[1]
    k, v = key[:, :, :W], value[:, :, :W]
    args = (scale, window, layer_idx, precision, policy)
    if attention_mask is None or bool(attention_mask.bool().all()):
        return _prompt_one(query, k, v, *args)
    pads = check_left_padded(attention_mask)
    out = torch.zeros_like(query)
    for b, pad in enumerate(pads):
        r0 = max(0, pad - (W - S))  # the first query row that is a real token
        out[b:b + 1, :, r0:] = _prompt_one(query[b:b + 1, :, r0:], k[b:b + 1, :, pad:], v[b:b + 1, :, pad:], *args)
    return out


def kernels_cover(query, key) -> bool:
    return query.is_cuda and query.dtype in SUPPORTED_DTYPES and query.shape[-1] in SUPPORTED_HEAD_DIMS


def decode(query, key, value, *, cache_seqlens, cache_leftpad, layer_idx, window, scale, precision, policy):
    """One decode step over a cache's tensors: the kernels, the reference on CPU, or SDPA."""
    if kernels_cover(query, key):
        from .. import hydra as _hydra

        return _hydra(query, key, value, sliding_window=window, policy_layer_idx=layer_idx, precision=precision,
                      policy=policy, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, scale=scale)
    if not query.is_cuda:
        _notice("cpu", "hydra: no CUDA tensors, so hydra_attention runs hydra.reference (pure PyTorch, slow)")
        return reference.hydra(query, key, value, sliding_window=window, policy_layer_idx=layer_idx,
                               precision=precision, policy=policy, cache_seqlens=cache_seqlens,
                               cache_leftpad=cache_leftpad, scale=scale)
    _notice(f"dense-{query.dtype}-{query.shape[-1]}",
            f"hydra: the kernels take bf16/fp16 with head dim in {SUPPORTED_HEAD_DIMS}; got {query.dtype}, "
            f"D={query.shape[-1]}, so hydra_attention attends densely (SDPA)")
    if cache_seqlens is None:
        return causal_sdpa(query, key, value, scale, window)
    B, Tkv = query.shape[0], key.shape[2]
    pos = torch.arange(Tkv, device=query.device).view(1, -1)
    mask = (pos < cache_seqlens.view(-1, 1)) & (pos >= cache_leftpad.view(-1, 1))
    if window is not None:
        mask = mask & (pos >= cache_seqlens.view(-1, 1) - window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.view(B, 1, 1, Tkv), scale=scale,
                                          enable_gqa=query.shape[1] != key.shape[1])


def hydra_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: hydra decode, dense prompts (see the module notes).

    Returns (out (B, S, Hq, D) in query's dtype, None).
    """
    if dropout:
        raise ValueError(f"hydra: hydra_attention is for inference and takes no attention dropout, got "
                         f"dropout={dropout} (call model.eval())")
    if kwargs.get("output_attentions"):
        raise ValueError("hydra: hydra_attention cannot return attention weights (output_attentions=True); "
                         "use attn_implementation='eager' for them")
    layer_idx = getattr(module, "layer_idx", None)
    window = _sliding_window(module, kwargs)
    link = None if torch.compiler.is_compiling() else getattr(key, "_hydra_layer", None)
    owner = link() if link is not None else None
    if owner is not None:  # a HydraCache layer
        out = owner.attention(query, key, value, attention_mask, layer_idx=layer_idx, window=window, scale=scaling)
    elif query.shape[2] == 1:
        lens, pad = _padding(attention_mask, query.shape[0], key.shape[2], query.device)
        out = decode(query, key, value, cache_seqlens=lens, cache_leftpad=pad, layer_idx=layer_idx, window=window,
                     scale=scaling, precision=_DEFAULTS["precision"], policy=_DEFAULTS["policy"])
    else:
        out = prompt_attention(query, key, value, attention_mask, scaling, window, layer_idx,
                               _DEFAULTS["precision"], _DEFAULTS["policy"])
    return out.transpose(1, 2).contiguous(), None
