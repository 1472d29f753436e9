"""Frozen, validated configuration of KV-cache compression (one object, every policy selected by name)."""

from __future__ import annotations

import dataclasses
import math

from selmerge_jax.validation import check_choice, check_int, check_number, fail

__all__ = ["MERGES", "POLICIES", "QUANTS", "SCORINGS", "KVCompressionConfig"]

POLICIES = ("none", "streaming", "h2o", "snapkv", "tova")
SCORINGS = ("gqa", "published", "kvpress")
MERGES = ("none", "nearest", "value", "centroid")
QUANTS = ("none", "int8", "int4")
SUMMARY_MODES = ("cumulative", "ema")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCompressionConfig:
    """What to keep in the KV cache and how; every size is in slots per (batch row, kv head).

    Attributes:
      policy: scorer deciding which tokens survive: ``"none"`` (never compress), ``"streaming"`` (sinks + most
        recent), ``"h2o"`` (accumulated attention), ``"snapkv"`` (pooled attention from the observation window
        of the last prompt queries), ``"tova"`` (attention from the latest query).
      scoring: which variant of the policy's score (``kvcache.policies`` docstring has the full table):
        ``"gqa"`` (default, GQA-native: one score per kv head, summed over its G query heads; H2O the
        accumulated sum, TOVA the latest query per kv head), ``"published"`` (the papers: TOVA averages the
        latest query over every head of the layer, one kept set shared by all kv heads; H2O as ``"gqa"``),
        ``"kvpress"`` (kvpress's presses: TOVAPress as ``"published"``; ObservedAttentionPress divides H2O's
        sum by the number of queries that saw each key). SnapKV is the same in all three (kvpress's
        SnapKVPress).
      budget: absolute slots kept after each compression (tokens + merged/summary slots). Exactly one of
        ``budget``, ``ratio``, ``layer_budgets`` is set.
      ratio: fraction of the context kept, in (0, 1]; resolved per call with :meth:`budget_for`.
      layer_budgets: one absolute budget per layer (PyramidKV-style schedules).
      slack: free slots above the budget, filled between compressions (decode steps, a prefill chunk); the
        cache capacity is ``budget + slack`` and compression runs once every ``slack`` decode steps.
      sink: the first ``sink`` positions are never evicted (StreamingLLM attention sinks).
      window: the most recent ``window`` positions are never evicted.
      obs_window / pool_kernel / pool: SnapKV's observation window (the last ``obs_window`` real queries vote;
        their own positions are always kept, so for ``"snapkv"`` the protected recent span is
        ``max(window, obs_window)``), the 1-D pooling width (odd; zero padding counted, as torch's
        ``avg_pool1d``) and kind (``"avg"``, as SnapKV and kvpress, or ``"max"``) that keeps neighbours of
        important tokens.
      merge: what happens to evicted tokens: ``"none"`` (dropped), ``"nearest"`` (K and V averaged into the
        kept slot with the most similar key, counts added), ``"value"`` (only V mixed into that slot; keys,
        positions and counts untouched), ``"centroid"`` (``merge_slots`` region centroids: mean K/V of
        contiguous position ranges of the evicted tokens, each with its count).
      merge_slots: slots reserved for centroids (``merge="centroid"``).
      summary_slots / summary_mode / summary_decay: reserved memory slots fed by evicted K/V with a cumulative
        (exact running mean) or exponential moving average.
      quant / quant_group / quant_window: int8/int4 storage (keys per channel in groups of ``quant_group``
        tokens, values per token) with the latest ``quant_window`` tokens kept in full precision.
    """

    policy: str = "h2o"
    scoring: str = "gqa"
    budget: int | None = None
    ratio: float | None = None
    layer_budgets: tuple[int, ...] | None = None
    slack: int = 64
    sink: int = 4
    window: int = 32
    obs_window: int = 32
    pool_kernel: int = 5
    pool: str = "avg"
    merge: str = "none"
    merge_slots: int = 0
    summary_slots: int = 0
    summary_mode: str = "cumulative"
    summary_decay: float = 0.9
    quant: str = "none"
    quant_group: int = 32
    quant_window: int = 32

    def __post_init__(self):
        for name, allowed in (("policy", POLICIES), ("scoring", SCORINGS), ("merge", MERGES),
                              ("quant", QUANTS),
                              ("pool", ("avg", "max")), ("summary_mode", SUMMARY_MODES)):
            check_choice(f"KVCompressionConfig.{name}", getattr(self, name), allowed)
        for name in ("sink", "window", "merge_slots", "summary_slots"):
            check_int(f"KVCompressionConfig.{name}", getattr(self, name), 0)
        for name in ("slack", "obs_window", "pool_kernel", "quant_group", "quant_window"):
            check_int(f"KVCompressionConfig.{name}", getattr(self, name), 1)
        if self.pool_kernel % 2 == 0:
            fail("KVCompressionConfig.pool_kernel", self.pool_kernel, "odd (centred pooling)")
        check_number("KVCompressionConfig.summary_decay", self.summary_decay, 0, 1,
                     low_open=True, high_open=True)
        if (self.merge == "centroid") != (self.merge_slots > 0):
            raise ValueError(f"KVCompressionConfig.merge_slots={self.merge_slots} must be > 0 exactly when "
                             f"merge='centroid' (merge={self.merge!r})")
        if self.summary_slots and self.merge != "none":
            raise ValueError(f"KVCompressionConfig.summary_slots={self.summary_slots} "
                             f"with merge={self.merge!r}: "
                             "an evicted token would be counted twice (merged and summarised); pick one")
        self._check_budget_fields()

    def _check_budget_fields(self) -> None:
        given = [n for n in ("budget", "ratio", "layer_budgets") if getattr(self, n) is not None]
        if self.policy == "none":
            if given:
                raise ValueError(f"KVCompressionConfig.policy='none' keeps everything; do not set {given}")
            return
        if len(given) != 1:
            raise ValueError("KVCompressionConfig needs exactly one of budget, ratio, "
                             "layer_budgets for policy="
                             f"{self.policy!r}, got {given or 'none'}")
        check_number("KVCompressionConfig.ratio", self.ratio, 0, 1, low_open=True, allow_none=True)
        budgets = [self.budget] if self.budget is not None else list(self.layer_budgets or ())
        if self.layer_budgets is not None and not budgets:
            raise ValueError("KVCompressionConfig.layer_budgets must name at least one layer")
        for i, b in enumerate(budgets):
            name = "budget" if self.budget is not None else f"layer_budgets[{i}]"
            check_int(f"KVCompressionConfig.{name}", b, 1)
            if b < self.min_budget:
                recent = (f"max(window={self.window}, obs_window={self.obs_window})"
                          if self.policy == "snapkv"
                          else f"window={self.window}")
                raise ValueError(f"KVCompressionConfig.{name}={b} is too small: "
                                 f"sink={self.sink} + {recent} + "
                                 f"reserved={self.reserved} (merge/summary slots) = "
                                 f"{self.min_budget} slots are "
                                 "protected (window larger than the budget?)")

    @property
    def recent(self) -> int:
        """The most recent positions never evicted: ``window``, and for SnapKV also its observation window."""
        return max(self.window, self.obs_window) if self.policy == "snapkv" else self.window

    @property
    def reserved(self) -> int:
        """Slots at the front of the cache that hold centroids and summaries, never plain tokens."""
        return self.merge_slots + self.summary_slots

    @property
    def min_budget(self) -> int:
        """Smallest legal budget: the protected sinks and recent positions plus the reserved slots (at least
        1)."""
        return max(1, self.sink + self.recent + self.reserved)

    def budget_for(self, context_len: int, layer: int = 0) -> int:
        """The static budget for a layer given the (static, Python int) context length it will hold."""
        check_int("context_len", context_len, 1)
        if self.policy == "none":
            return context_len
        if self.layer_budgets is not None:
            if not 0 <= layer < len(self.layer_budgets):
                raise ValueError(f"layer={layer} outside layer_budgets of length {len(self.layer_budgets)}")
            return self.layer_budgets[layer]
        if self.budget is not None:
            return self.budget
        assert self.ratio is not None  # __post_init__: exactly one of budget, ratio, layer_budgets
        return max(self.min_budget, math.ceil(self.ratio * context_len))

    def capacity_for(self, context_len: int, layer: int = 0) -> int:
        """Cache slots to allocate: the budget plus the slack filled between compressions."""
        if self.policy == "none":
            return context_len
        return self.budget_for(context_len, layer) + self.slack

    def check_capacity(self, budget: int, capacity: int, incoming: int = 0) -> None:
        """Raises if a compression to ``budget`` cannot leave room for ``incoming`` tokens in ``capacity``
        slots."""
        if budget > capacity:
            raise ValueError(f"budget={budget} is larger than the cache capacity C={capacity}")
        if budget + incoming > capacity:
            raise ValueError(f"budget={budget} + incoming T={incoming} tokens exceeds the cache capacity "
                             f"C={capacity}; allocate capacity >= budget + T (raise "
                             "KVCompressionConfig.slack)")
        if budget < self.min_budget:
            raise ValueError(f"budget={budget} is below sink + recent window + reserved = {self.min_budget}")
