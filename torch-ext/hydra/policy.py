"""Selection policy: presets and the ``HydraPolicy`` record.

The policy says which tokens a decode step attends to (SPEC section 2):
sink tokens, a recent window, and the ``budget_tokens // page_size - |sink U recent|``
older pages that score highest for the current query.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

__all__ = ["HydraPolicy", "PRESETS", "resolve_policy", "SCORERS", "SUMMARY_DTYPES"]

SCORERS = ("quest_sum",)
# How page summaries are stored where hydra builds them (HydraKVCache, and the
# summaries a coarse-to-fine call builds when none are passed): "auto" in the keys'
# dtype, exact; "fp8_e4m3" as e4m3 rounded outward (half the bytes; see README).
SUMMARY_DTYPES = ("auto", "fp8_e4m3")

# budget_tokens=None means "all tokens": exact attention through the same kernels.
PRESETS = {
    "exact": dict(budget_tokens=None),
    "high": dict(budget_tokens=4096, sink_tokens=64, recent_tokens=512),
    "balanced": dict(budget_tokens=2048, sink_tokens=64, recent_tokens=512),
    "fast": dict(budget_tokens=1024, sink_tokens=64, recent_tokens=256),
}


def check_summary_scale(scale, name: str) -> None:
    """e4m3 summaries store key * scale: a power of two (exact, rank-preserving) in [2^-16, 2^16]."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
            or math.frexp(scale)[0] != 0.5 or not (2.0 ** -16 <= scale <= 2.0 ** 16):
        raise ValueError(f"hydra: {name} must be a power of two in [2^-16, 2^16], got {scale!r}")


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class HydraPolicy:
    """Which tokens a decode or prefill step attends to.

    Parameters
    ----------
    page_size : int
        Tokens per page, a power of two in [8, 64]. Pages are the unit of
        decode selection; each has a min/max key summary.
    sink_tokens : int
        The first tokens of every sequence, always attended.
    recent_tokens : int
        The last tokens of every sequence, always attended.
    budget_tokens : int or None
        Tokens attended per (sequence, KV head): sink + recent + top-k pages.
        ``None`` means every token (exact attention).
    dense_layers : int
        Layers with ``policy_layer_idx < dense_layers`` attend densely.
    block_size : int
        Query and key block size of the prefill selection.
    scorer : str
        Page scoring rule; ``"quest_sum"`` is the Quest upper bound summed
        over the GQA group.
    superpage : int
        0 (default): flat selection, every candidate page is scored. A power of two
        ``S`` in [2, 1024]: coarse-to-fine selection. Superpages of ``S`` pages carry
        their own min/max summaries; a step scores the superpages holding a candidate
        page, keeps the best ``n_short`` (the shortlist), scores only the pages inside
        it, and takes the top pages from those. A page can be missed (against flat
        selection) only when its superpage ranks outside the shortlist.
    shortlist : int
        Shortlist size as a multiple of the page budget: ``n_short =
        ceil(shortlist * n_sel / superpage)`` superpages, ``shortlist * n_sel`` pages.
    summary_dtype : str
        How summaries hydra builds are stored: ``"auto"`` (default) in the keys'
        dtype, the exact min/max; ``"fp8_e4m3"``: the min and max of
        ``k * summary_scale`` rounded outward to e4m3, so the bound still holds at
        half the bytes a decode step reads for scoring. Summaries passed in are
        read in whatever of these two forms they come.
    summary_scale : float
        A power of two in [2^-16, 2^16] that multiplies the keys before e4m3
        rounding. It changes no ranking; it keeps keys inside e4m3's +-448 (a value
        outside saturates, and its page's bound becomes very large, still valid).

    Examples
    --------
    >>> HydraPolicy(budget_tokens=2048).n_sel
    128
    """

    page_size: int = 16
    sink_tokens: int = 64
    recent_tokens: int = 512
    budget_tokens: Optional[int] = 4096
    dense_layers: int = 2
    block_size: int = 64
    scorer: str = "quest_sum"
    superpage: int = 0
    shortlist: int = 4
    summary_dtype: str = "auto"
    summary_scale: float = 1.0

    def __post_init__(self):
        for name in ("page_size", "sink_tokens", "recent_tokens", "dense_layers", "block_size", "superpage",
                     "shortlist"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"hydra: HydraPolicy.{name} must be an int, got {value!r}")
        if not (_is_pow2(self.page_size) and 8 <= self.page_size <= 64):
            raise ValueError(
                f"hydra: HydraPolicy.page_size must be a power of two in [8, 64], got {self.page_size}")
        if self.sink_tokens < 0:
            raise ValueError(f"hydra: HydraPolicy.sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.recent_tokens < 0:
            raise ValueError(f"hydra: HydraPolicy.recent_tokens must be >= 0, got {self.recent_tokens}")
        if self.dense_layers < 0:
            raise ValueError(f"hydra: HydraPolicy.dense_layers must be >= 0, got {self.dense_layers}")
        if not (_is_pow2(self.block_size) and 16 <= self.block_size <= 256):
            raise ValueError(
                f"hydra: HydraPolicy.block_size must be a power of two in [16, 256], got {self.block_size}")
        if self.superpage != 0 and not (_is_pow2(self.superpage) and 2 <= self.superpage <= 1024):
            raise ValueError(
                f"hydra: HydraPolicy.superpage must be 0 (flat) or a power of two in [2, 1024], got {self.superpage}")
        if self.shortlist < 1:
            raise ValueError(f"hydra: HydraPolicy.shortlist must be >= 1, got {self.shortlist}")
        if self.summary_dtype not in SUMMARY_DTYPES:
            raise ValueError(f"hydra: HydraPolicy.summary_dtype must be one of {SUMMARY_DTYPES}, "
                             f"got {self.summary_dtype!r}")
        check_summary_scale(self.summary_scale, "HydraPolicy.summary_scale")
        if self.scorer not in SCORERS:
            raise ValueError(f"hydra: HydraPolicy.scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.budget_tokens is None:
            return
        b = self.budget_tokens
        if not isinstance(b, int) or isinstance(b, bool):
            raise TypeError(f"hydra: HydraPolicy.budget_tokens must be an int or None, got {b!r}")
        if b <= 0 or b % self.page_size:
            raise ValueError(
                f"hydra: HydraPolicy.budget_tokens must be a positive multiple of page_size "
                f"({self.page_size}), got {b}")
        # Room for the forced pages plus at least one scored page, in the worst
        # alignment of the recent window (it can straddle one extra page).
        forced = self.sink_pages + -(-self.recent_tokens // self.page_size) + 1
        if forced + 1 > self.n_sel:
            raise ValueError(
                f"hydra: HydraPolicy.budget_tokens={b} leaves no room for scored pages after "
                f"sink_tokens={self.sink_tokens} and recent_tokens={self.recent_tokens} "
                f"(needs more than {forced * self.page_size})")

    @property
    def exact(self) -> bool:
        return self.budget_tokens is None

    @property
    def n_sel(self) -> int:
        """Fixed length of a page list: ``budget_tokens // page_size``."""
        if self.budget_tokens is None:
            raise ValueError("hydra: an exact policy (budget_tokens=None) has no page budget")
        return self.budget_tokens // self.page_size

    @property
    def coarse(self) -> bool:
        """Coarse-to-fine selection (``superpage > 1``) on a selecting policy."""
        return self.superpage > 1 and self.budget_tokens is not None

    @property
    def n_short(self) -> int:
        """Shortlist length in superpages: ``ceil(shortlist * n_sel / superpage)``."""
        if not self.coarse:
            return 0
        return -(-self.shortlist * self.n_sel // self.superpage)

    @property
    def summary_torch_dtype(self):
        """``torch.float8_e4m3fn`` for ``"fp8_e4m3"``, else None (the keys' dtype)."""
        if self.summary_dtype == "fp8_e4m3":
            import torch

            return torch.float8_e4m3fn
        return None

    @property
    def sink_pages(self) -> int:
        return -(-self.sink_tokens // self.page_size)


def resolve_policy(precision: str = "high", policy: Optional[HydraPolicy] = None) -> HydraPolicy:
    """The preset named by ``precision``, with any fields ``policy`` sets overriding it.

    A field of ``policy`` overrides the preset when it differs from the
    ``HydraPolicy`` default, so ``HydraPolicy(page_size=8)`` with
    ``precision="fast"`` is the fast preset with 8-token pages.
    """
    if not isinstance(precision, str) or precision not in PRESETS:
        raise ValueError(
            f"hydra: precision must be one of {sorted(PRESETS)}, got {precision!r}")
    if policy is not None and not isinstance(policy, HydraPolicy):
        raise TypeError(f"hydra: policy must be a hydra.HydraPolicy or None, got {type(policy).__name__}")
    fields = dict(PRESETS[precision])
    if policy is not None:
        for name in _FIELD_NAMES:  # precomputed: torch.compile cannot trace dataclasses.fields
            value = getattr(policy, name)
            if value != getattr(_DEFAULT_POLICY, name):
                fields[name] = value
    if precision == "exact":
        fields["budget_tokens"] = None
    return HydraPolicy(**fields)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(HydraPolicy))
_DEFAULT_POLICY = HydraPolicy()
