"""Selective decode at long context: each step attends to the top blocks of the cache for its query (plus
merged centroids of the others), over a full or a compressed cache.

:class:`SelectiveCache` is a layer's cache plus its :class:`query_select.BlockIndex` (one mean key/value per
block of ``block`` slots), carried between decode steps and refreshed for the slots a step writes, so a step
reads R = C / block summaries and ``top_m * block`` slots instead of all C. :func:`selective_step` is the
decode step: (compress when full, then rebuild the index) -> append -> refresh -> select -> attend ->
observe. With a compression config it keeps the cache within ``budget + slack`` slots as ``policies.step``
does; the policy's scores see the selected slots' probabilities (an unselected token received no attention
at that step).

Batches with ragged prompts work as everywhere in the cache: the write cursor is shared, each row's padding
(position -1) is never selected nor attended, and each (row, kv head) selects its own blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from selmerge_jax.kernels.selective_decode import IMPLEMENTATIONS as DECODE_KERNELS
from selmerge_jax.kvcache import policies
from selmerge_jax.kvcache.cache import KVCache, append
from selmerge_jax.kvcache.config import KVCompressionConfig
from selmerge_jax.kvcache.query_select import BlockIndex, attend_selected, build_index, refresh_index
from selmerge_jax.validation import check_choice, check_int, check_positive_int, fail

__all__ = ["DecodeSelection", "SelectiveCache", "init_selective", "selective_step"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSelection:
    """Which blocks a decode step attends to.

    Attributes:
      block: slots per block (region); must divide the cache capacity.
      top_m: blocks attended exactly per (batch row, kv head), the forced ones included.
      sink_blocks / local_blocks: the first blocks and the block of the write cursor (the newest tokens) are
        always among them.
      centroids: every other non-empty block is also attended through one merged token (mean K/V, its count
        on the logit), as the training-time select-and-merge does.
      kernel: how a one-token step attends its blocks (``query_select.attend_selected``): ``"auto"`` the
        Pallas kernel ``kernels.selective_decode`` on a GPU, the pure-JAX gather elsewhere; ``"xla"``;
        ``"pallas_triton"``.
    """

    block: int = 64
    top_m: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1
    centroids: bool = True
    kernel: str = "auto"

    def __post_init__(self):
        check_choice("DecodeSelection.kernel", self.kernel, DECODE_KERNELS)
        check_positive_int("DecodeSelection.block", self.block)
        check_positive_int("DecodeSelection.top_m", self.top_m)
        check_int("DecodeSelection.sink_blocks", self.sink_blocks, 0)
        check_int("DecodeSelection.local_blocks", self.local_blocks, 0)
        if self.sink_blocks + self.local_blocks > self.top_m:
            fail("DecodeSelection.top_m", self.top_m,
                 f">= sink_blocks + local_blocks = {self.sink_blocks + self.local_blocks}")

    def check_capacity(self, capacity: int) -> None:
        """Raises unless ``block`` divides ``capacity`` and ``top_m`` blocks exist."""
        if capacity % self.block:
            fail("DecodeSelection.block", self.block, f"a divisor of the cache capacity C={capacity}",
                 f"one of {[d for d in range(1, min(capacity, 512) + 1) if capacity % d == 0][-6:]}")
        if self.top_m > capacity // self.block:
            fail("DecodeSelection.top_m", self.top_m,
                 f"<= C / block = {capacity // self.block} blocks (C={capacity}, block={self.block})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectiveCache:
    """A layer's cache and the block summaries of its slots (kept current by :func:`selective_step`)."""

    cache: KVCache
    index: BlockIndex

    @property
    def capacity(self) -> int:
        return self.cache.capacity


def init_selective(cache: KVCache, selection: DecodeSelection) -> SelectiveCache:
    """Wraps a (prefilled) cache and builds its block index (O(C), once after the prefill)."""
    selection.check_capacity(cache.capacity)
    return SelectiveCache(cache=cache, index=build_index(cache, selection.block))


def selective_step(sc: SelectiveCache, selection: DecodeSelection, q, k, v, positions, *,
                   config: KVCompressionConfig | None = None, budget: int | None = None,
                   scale: float | None = None):
    """One decode step over the selected blocks: q ``[B, T, N, H]``, k/v ``[B, T, K, H]``, positions
    ``int [B, T]``. With ``config`` (a compression policy) the cache is first compressed to ``budget`` when
    the new tokens would not fit, and the index rebuilt. Returns ``(out [B, T, N, H], SelectiveCache)``."""
    cache, index = sc.cache, sc.index
    t = k.shape[1]
    compressing = config is not None and config.policy != "none"
    if compressing:
        if budget is None:
            raise ValueError("selective_step: a compression config needs its budget")
        config.check_capacity(budget, cache.capacity, t)

        def squeeze(c, _):
            c = policies.compress(c, config, budget)
            return c, build_index(c, selection.block)

        cache, index = jax.lax.cond(cache.length + t > cache.capacity, squeeze, lambda c, i: (c, i),
                                    cache, index)
    start = jnp.minimum(cache.length, cache.capacity - t)  # where append writes its window
    cache = append(cache, k, v, positions)
    index = refresh_index(index, cache, start, t)
    kw = dict(block=selection.block, top_m=selection.top_m, sink_blocks=selection.sink_blocks,
              local_blocks=selection.local_blocks, centroids=selection.centroids, scale=scale, index=index,
              kernel=selection.kernel)
    if compressing and policies.needs_probs(config):
        out, probs = attend_selected(cache, q, positions, return_probs=True, **kw)
        cache = policies.observe(cache, probs, config, positions)
    else:
        out = attend_selected(cache, q, positions, **kw)
    return out, SelectiveCache(cache=cache, index=index)
