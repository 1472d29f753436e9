"""Eviction policies behind one contract: ``observe`` updates a per-slot score, ``compress`` keeps the top
slots.

Contract (every policy, every kv head independently, GQA-native: scores are summed over the G query heads of a
kv head, never stored per query head):

1. ``observe(cache, probs, config)``: fold the attention probabilities ``[B, K, G, T, C]`` returned by
   ``attend(..., return_probs=True)`` into ``cache.score`` (H2O accumulates, TOVA keeps the latest query,
   SnapKV votes with its observation window and pools; StreamingLLM needs nothing).
2. ``slot_scores(cache, config)``: the ranking score ``[B, K, C]``; sinks and the recent window are +inf,
   empty and reserved slots -inf.
3. ``compress(cache, config, budget)``: keeps the ``budget - reserved`` best token slots per kv head (in slot
   order, so pooled neighbours stay neighbours), merges or summarises the rest, and compacts to the front.
   Shapes never change: the capacity stays C, ``length`` becomes ``budget``.

``step`` chains make_room -> append -> attend -> observe: the one call a decode loop or a prefill chunk makes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from selmerge_jax.kvcache import merging
from selmerge_jax.kvcache.cache import KVCache, append, attend, gather_slots, init_cache
from selmerge_jax.kvcache.config import KVCompressionConfig

__all__ = ["compress", "init_for", "make_room", "needs_probs", "observe", "slot_scores", "step"]

_PROTECT = 3e38  # above any real score, below +inf so protected slots still rank among themselves by nothing


def needs_probs(config: KVCompressionConfig) -> bool:
    """Whether ``observe`` needs attention probabilities (the caller must
    ``attend(..., return_probs=True)``)."""
    return config.policy in ("h2o", "snapkv", "tova")


def init_for(config: KVCompressionConfig, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype):
    """An empty cache whose first ``config.reserved`` slots are held for centroids/summaries (cursor after
    them)."""
    if config.reserved >= capacity:
        raise ValueError(f"capacity={capacity} must exceed the reserved merge/summary "
                         f"slots ({config.reserved})")
    cache = init_cache(batch, kv_heads, capacity, head_dim, dtype)
    return dataclasses.replace(cache, length=jnp.asarray(config.reserved, jnp.int32))


def _pool(x, kernel: int, kind: str):
    """Centred 1-D pooling along slots (SnapKV's clustering), ``x [B, K, C]``."""
    pad = [(0, 0), (0, 0), (kernel // 2, kernel // 2)]
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), pad)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), pad) / kernel


def observe(cache: KVCache, probs, config: KVCompressionConfig) -> KVCache:
    """Folds attention probabilities ``float32 [B, K, G, T, C]`` into ``cache.score`` per the policy."""
    if config.policy in ("none", "streaming"):
        return cache
    if probs.shape[:2] != cache.pos.shape[:2] or probs.shape[-1] != cache.capacity or probs.ndim != 5:
        raise ValueError(f"probs must be [B, K, G, T, C={cache.capacity}] from attend(return_probs=True), "
                         f"got {probs.shape}")
    received = probs.sum(2)  # [B, K, T, C]: summed over the G query heads of each kv head
    if config.policy == "h2o":
        score = cache.score + received.sum(2)
    elif config.policy == "tova":
        # The latest *real* query: a right-padded chunk may end in padding rows, whose probabilities are all
        # 0.
        real = received.sum(-1) > 0  # [B, K, T]
        last = received.shape[2] - 1 - jnp.argmax(real[..., ::-1], axis=-1)
        score = jnp.take_along_axis(received, last[..., None, None], axis=2)[:, :, 0]
    else:  # snapkv: a prompt chunk votes with its last obs_window queries; decode steps keep voting
        vote = _pool(received[:, :, -config.obs_window:].sum(2), config.pool_kernel, config.pool)
        score = vote if probs.shape[3] > 1 else cache.score + vote
    return dataclasses.replace(cache, score=score)


def slot_scores(cache: KVCache, config: KVCompressionConfig):
    """``float32 [B, K, C]`` ranking: higher is kept; protected +3e38, empty/reserved -inf."""
    pos = cache.pos
    valid = pos >= 0
    base = pos.astype(jnp.float32) if config.policy == "streaming" else cache.score
    newest = jnp.max(pos, axis=-1, keepdims=True)
    protected = (pos < config.sink) | (pos > newest - config.window)
    s = jnp.where(protected, _PROTECT, base)
    s = jnp.where(valid, s, -jnp.inf)
    reserved = jnp.arange(cache.capacity) < config.reserved
    return jnp.where(reserved, -jnp.inf, s)


def compress(cache: KVCache, config: KVCompressionConfig, budget: int) -> KVCache:
    """Keeps ``budget`` slots per (batch row, kv head): reserved slots, then the best tokens in slot order."""
    config.check_capacity(budget, cache.capacity)
    r = config.reserved
    keep = budget - r
    kept_idx, kept = _keep_best(slot_scores(cache, config), keep)
    slot = jnp.arange(cache.capacity)
    evicted = (cache.pos >= 0) & ~kept & (slot >= r)
    bk = cache.pos.shape[:2]
    reserved_idx = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (*bk, r))
    free = jnp.full((*bk, cache.capacity - budget), -1, jnp.int32)  # capacity stays C: static shapes
    out = gather_slots(cache, jnp.concatenate([reserved_idx, kept_idx, free], -1), length=budget)
    if config.merge in ("nearest", "value"):
        k, v, c = merging.merge_into_kept(cache.k, cache.v, cache.count, kept_idx, evicted,
                                          value_only=config.merge == "value")
        out = _write(out, r, k=k, v=v, count=c)
    elif config.merge == "centroid":
        member = evicted | ((slot < config.merge_slots) & (cache.pos >= 0))  # old centroids are re-bucketed
        k, v, c, p = merging.centroids(cache.k, cache.v, cache.pos, cache.count, member, config.merge_slots)
        out = _write(out, 0, k=k, v=v, count=c, pos=p)
    if config.summary_slots:
        out = _fold_summary(cache, out, evicted, config)
    return out


def _keep_best(scores, keep: int):
    """Sorted indices ``int32 [B, K, keep]`` of the best slots and their mask ``bool [B, K, C]``.

    ``lax.top_k`` costs grow with k (a sort when k is large), and a decode-time compression keeps almost every
    slot (keep = budget, C - keep = slack). So when fewer slots are dropped than kept, top_k finds the
    *dropped* ones and the kept indices come from a cumulative sum (O(C), already in slot order); ties evict
    lower slots first in that branch. Slot order == position order of appended tokens, which SnapKV pooling
    and block selection rely on.
    """
    b, k, c = scores.shape
    if keep >= c - keep:
        _, low = jax.lax.top_k(-scores, c - keep)
        mask = jnp.ones(scores.shape, bool).at[_bk_index(low)].set(False)
        rank = jnp.where(mask, jnp.cumsum(mask, -1) - 1, keep)  # dropped slots aim past the end: discarded
        idx = jnp.zeros((b, k, keep), jnp.int32).at[_bk_index(rank)].set(
            jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), scores.shape), mode="drop")
        return idx, mask
    _, top = jax.lax.top_k(scores, keep)
    idx = jnp.sort(top, axis=-1).astype(jnp.int32)
    return idx, jnp.zeros(scores.shape, bool).at[_bk_index(idx)].set(True)


def _bk_index(idx):
    b, k, _ = idx.shape
    return jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], idx


def _write(cache: KVCache, start: int, **fields) -> KVCache:
    """Overwrites slots ``[start, start + n)`` of the given fields (k/v/count/pos) with new values."""
    updates = {}
    for name, val in fields.items():
        dst = getattr(cache, name)
        updates[name] = jax.lax.dynamic_update_slice_in_dim(dst, val.astype(dst.dtype), start, axis=2)
    return dataclasses.replace(cache, **updates)


def _fold_summary(old: KVCache, out: KVCache, evicted, config: KVCompressionConfig) -> KVCache:
    n, s0 = config.summary_slots, config.merge_slots
    bucket = merging.position_buckets(old.pos, old.count, evicted, n)
    new = merging.bucket_means(old.k, old.v, old.pos, old.count, evicted, bucket, n)
    sl = lambda x: jax.lax.slice_in_dim(x, s0, s0 + n, axis=2)
    summary = (sl(old.k), sl(old.v), sl(old.count), sl(old.pos))
    k, v, c, p = merging.update_summary(summary, new, mode=config.summary_mode, decay=config.summary_decay)
    return _write(out, s0, k=k, v=v, count=c, pos=p)


def make_room(cache: KVCache, config: KVCompressionConfig, budget: int, incoming: int) -> KVCache:
    """Compresses to ``budget`` iff ``incoming`` more tokens would not fit (a ``lax.cond``: jit-static)."""
    if config.policy == "none":
        return cache
    config.check_capacity(budget, cache.capacity, incoming)
    full = cache.length + incoming > cache.capacity
    # A cond, not a 0/1-trip while loop: measured on the H100
    # (experiments/results/archive/kvcache_h100_v3.jsonl), the while loop cost 0.5-0.7 ms per decode step of a
    # 4-layer model (a device->host sync per loop), the cond nothing measurable (v2). In the optimised CPU HLO
    # the pass-through branch aliases the donated cache (no copy); only the compress branch copies its
    # gathered slots into the result buffers.
    return jax.lax.cond(full, lambda c: compress(c, config, budget), lambda c: c, cache)


def step(cache: KVCache, config: KVCompressionConfig, q, k, v, positions, *, budget: int,
         scale: float | None = None, window: int | None = None, room: bool = True):
    """One attention call against a compressed cache: make_room -> append -> attend -> observe.

    q ``[B, T, N, H]``, k/v ``[B, T, K, H]``, positions ``int [B, T]``. Returns ``(out [B, T, N, H], cache)``.
    Works for a decode step (T=1) and for a prefill chunk (T = chunk) alike. ``window``: the model's sliding
    window (each query sees the last ``window`` positions only; see ``cache.attend_slots``). ``room=False``
    skips ``make_room`` (no cond in the step): the caller compresses on its own schedule, e.g. every ``slack``
    decode steps with :func:`compress`, and guarantees the tokens fit.
    """
    if room:
        cache = make_room(cache, config, budget, q.shape[1])
    cache = append(cache, k, v, positions)
    if not needs_probs(config):
        return attend(cache, q, positions, scale=scale, window=window), cache
    out, probs, _ = attend(cache, q, positions, scale=scale, return_probs=True, window=window)
    return out, observe(cache, probs, config)
