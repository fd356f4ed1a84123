"""Hugging Face transformers integration: an attention function and a Cache.

>>> import hydra.integrations.transformers as ht
>>> ht.register()                                     # attn_implementation="hydra"
>>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="hydra", dtype=torch.bfloat16).cuda()
>>> cache = ht.HydraCache(model.config, max_cache_len=prompt_len + new_tokens)
>>> model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens)

From the Hub, with no import of hydra: ``attn_implementation="Frosty40/hydra:hydra_attention"``.

:class:`HydraCache` keeps each layer's K/V in a :class:`hydra.HydraKVCache`: the
prompt is stored with its left padding cut off (so padding is never attended and
never summarised), its page summaries are built once, and every decode step appends
and attends in one fused ``HydraKVCache.step``, reading only summaries and selected
pages. With transformers' own caches (DynamicCache, StaticCache) ``hydra_attention``
still works: decode passes the padding to the kernels as ``cache_leftpad`` and scores
pages from K each step.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import HydraKVCache
from ..policy import HydraPolicy, resolve_policy
from .attention import (causal_sdpa, check_left_padded, decode, hydra_attention, kernels_cover, prompt_attention,
                        set_defaults)

__all__ = ["register", "hydra_attention", "HydraCache", "HydraLayer", "set_defaults"]


def register(name: str = "hydra", *, precision: Optional[str] = None, policy: Optional[HydraPolicy] = None) -> str:
    """Register :func:`hydra_attention` (and the flash-attention-style 2-D padding mask it
    takes) with transformers under ``name``; ``precision``/``policy`` set the defaults for
    caches that carry none. Returns ``name``, for ``attn_implementation=``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    if precision is not None or policy is not None:
        set_defaults(precision or "high", policy)
    AttentionInterface.register(name, hydra_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


class _HostStore:
    """What a layer keeps where the kernels do not apply (CPU, fp32, other head dims):
    K/V buffers and per-sequence lengths, with the same compacted layout."""

    def __init__(self, B, H, D, max_len, dtype, device):
        self.k = torch.zeros(B, H, max_len, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(B, dtype=torch.int32, device=device)

    @property
    def seqlens(self):
        return self.lengths

    def prefill(self, k, v, seqlens=None):
        T = k.shape[2]
        self.k[:, :, :T] = k
        self.v[:, :, :T] = v
        self.lengths.copy_(seqlens if seqlens is not None else torch.full_like(self.lengths, T))

    def append(self, k_new, v_new):
        B, H, n, D = k_new.shape
        idx = (self.lengths.long().view(B, 1) + torch.arange(n, device=k_new.device)).view(B, 1, n, 1)
        self.k.scatter_(2, idx.expand(B, H, n, D), k_new)
        self.v.scatter_(2, idx.expand(B, H, n, D), v_new)
        self.lengths += n

    def reset(self):
        self.lengths.zero_()

    def tensors(self):
        return [self.k, self.v, self.lengths]


class HydraLayer(CacheLayerMixin):
    """One attention layer of :class:`HydraCache`. Only :func:`hydra_attention` reads it:
    the keys it returns carry a link back to the layer, and its storage is compacted
    (each sequence starts at position 0, whatever its padding)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, max_cache_len: int, precision: str = "high", policy: Optional[HydraPolicy] = None):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.precision, self.policy = precision, policy
        self.store = None
        self.seen = 0                # tokens transformers has written, padding included (its mask width)
        self._prompt_pending = False  # the prompt waits for hydra_attention to store it
        self._token = None            # (k_new, v_new) of a decode step, appended by the fused step

    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if kernels_cover(key_states, key_states):
            self.store = HydraKVCache(B, H, D, self.max_cache_len, dtype=key_states.dtype,
                                      device=key_states.device, policy=self.policy, precision=self.precision)
        else:
            self.store = _HostStore(B, H, D, self.max_cache_len, key_states.dtype, key_states.device)
        self.keys, self.values = self.store.k, self.store.v
        self.is_initialized = True

    def _link(self, t):
        t._hydra_layer = weakref.ref(self)
        return t

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.compiler.is_compiling():
            raise RuntimeError("hydra: HydraCache runs eagerly (it is not torch.compile-able yet); compile with "
                               "transformers' StaticCache, which hydra_attention also supports")
        if self._prompt_pending or self._token is not None:
            raise RuntimeError("hydra: a HydraCache layer was updated twice without hydra_attention reading it; "
                               "HydraCache needs attn_implementation='hydra' (hydra.integrations.transformers."
                               "register()) or 'Frosty40/hydra:hydra_attention'")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        if self.seen + n > self.max_cache_len:
            raise ValueError(f"hydra: HydraCache holds max_cache_len={self.max_cache_len} tokens; writing {n} more "
                             f"to {self.seen} would pass it (make the cache longer)")
        self.seen += n
        if self.seen == n:  # the prompt: hydra_attention attends it densely, then stores it unpadded
            self._prompt_pending = True
            return self._link(key_states), value_states
        if n == 1 and isinstance(self.store, HydraKVCache):
            self._token = (key_states, value_states)  # appended by the fused step in attention()
        else:
            self.store.append(key_states, value_states)
        return self._link(self.store.k), self.store.v

    def attention(self, query, key, value, attention_mask, *, layer_idx, window, scale):
        """Called by hydra_attention with what update() returned."""
        if self._prompt_pending:
            self._prompt_pending = False
            out = prompt_attention(query, key, value, attention_mask, scale, window, layer_idx, self.precision,
                                   self.policy)
            self._store_prompt(key, value, attention_mask)
            return out
        kw = dict(policy_layer_idx=layer_idx, sliding_window=window, scale=scale)
        if self._token is not None:
            k_new, v_new = self._token
            self._token = None
            return self.store.step(query, k_new, v_new, **kw)
        if query.shape[2] == 1:
            if isinstance(self.store, HydraKVCache):
                return self.store.attend(query, **kw)
            return decode(query, self.store.k, self.store.v, cache_seqlens=self.store.seqlens, cache_leftpad=None,
                          layer_idx=layer_idx, window=window, scale=scale, precision=self.precision,
                          policy=self.policy)
        # a chunk after the prompt: dense over each sequence's own tokens (host sync)
        out = torch.empty_like(query)
        for b, L in enumerate(self.store.seqlens.tolist()):
            out[b:b + 1] = causal_sdpa(query[b:b + 1], self.store.k[b:b + 1, :, :L], self.store.v[b:b + 1, :, :L],
                                       scale, window)
        return out

    def load(self, keys, values, attention_mask=None) -> None:
        """Fill an empty layer with a prompt's K/V (B, Hkv, T, D) computed elsewhere, as if
        the model had run it; ``attention_mask`` (B, T) marks left padding."""
        if self.seen:
            raise ValueError(f"hydra: HydraLayer.load needs an empty layer, this one holds {self.seen} tokens")
        if keys.shape[2] > self.max_cache_len:
            raise ValueError(f"hydra: {keys.shape[2]} tokens do not fit max_cache_len={self.max_cache_len}")
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._store_prompt(keys, values, attention_mask)
        self.seen = keys.shape[2]

    def _store_prompt(self, key, value, attention_mask):
        S = key.shape[2]
        if attention_mask is None or bool(attention_mask.bool().all()):
            self.store.prefill(key, value)
            return
        pads = torch.tensor(check_left_padded(attention_mask[:, -S:]), device=key.device)
        B, H, _, D = key.shape
        idx = (torch.arange(S, device=key.device).view(1, S) + pads.view(B, 1)).clamp(max=S - 1)
        idx = idx.view(B, 1, S, 1).expand(B, H, S, D)
        self.store.prefill(key.gather(2, idx), value.gather(2, idx), (S - pads).to(torch.int32))

    # -- the rest of transformers' layer interface ------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()
        self.seen, self._prompt_pending, self._token = 0, False, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store is None:
            return
        idx = beam_idx.to(self.device)
        held = self.store.tensors() if isinstance(self.store, _HostStore) else \
            [t for t in (self.store.k, self.store.v, self.store.summaries, self.store.superpage_summaries,
                         self.store.seqlens) if t is not None]
        for t in held:
            t.copy_(t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("hydra: HydraCache has a fixed batch; it does not support contrastive search or "
                                  "beam expansion (use num_beams=1 or a DynamicCache)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("hydra: HydraCache has a fixed batch; it does not support batch selection")


class HydraCache(Cache):
    """A transformers ``Cache`` whose layers keep K/V and page summaries in
    :class:`hydra.HydraKVCache` (on CUDA), so that every decode step reads only the
    summaries and the selected pages.

    Parameters
    ----------
    config : a model config (``num_hidden_layers`` of its text config), or None with ``num_layers``.
    max_cache_len : int, the most tokens (prompt, padding included, plus generated) a sequence holds.
    precision, policy : as in :func:`hydra.hydra`, for every layer.

    Works with ``attn_implementation="hydra"`` (after :func:`register`) or the Hub form
    ``"Frosty40/hydra:hydra_attention"``; batch size is fixed by the prompt; beams and
    cropping (assisted decoding) are not supported.
    """

    def __init__(self, config=None, max_cache_len: Optional[int] = None, *, num_layers: Optional[int] = None,
                 precision: str = "high", policy: Optional[HydraPolicy] = None):
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise ValueError(f"hydra: HydraCache max_cache_len must be a positive int, got {max_cache_len!r}")
        resolve_policy(precision, policy)
        if num_layers is None:
            if config is None:
                raise ValueError("hydra: HydraCache needs a model config or num_layers")
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            num_layers = text.num_hidden_layers
        super().__init__(layers=[HydraLayer(max_cache_len, precision, policy) for _ in range(num_layers)])
