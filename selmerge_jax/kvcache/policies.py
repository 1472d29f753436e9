"""Eviction policies behind one contract: ``observe`` updates a per-slot score, ``compress`` keeps the top
slots.

Contract (every policy, every kv head independently unless a layer-wide variant is chosen; GQA-native: scores
are reduced over the G query heads of a kv head, never stored per query head):

1. ``observe(cache, probs, config, positions)``: fold the attention probabilities ``[B, K, G, T, C]`` returned
   by ``attend(..., return_probs=True)`` into the cache (H2O accumulates, TOVA keeps the latest query, SnapKV
   keeps the rows of its observation window; StreamingLLM needs nothing). Padding queries (position -1) never
   count.
2. ``slot_scores(cache, config)``: the ranking score ``[B, K, C]``; sinks and the recent window are +3e38,
   empty and reserved slots -inf.
3. ``compress(cache, config, budget)``: keeps the ``budget - reserved`` best token slots per kv head (in slot
   order, so pooled neighbours stay neighbours), merges or summarises the rest, and compacts to the front.
   Shapes never change: the capacity stays C, ``length`` becomes ``budget``.

``step`` chains make_room -> append -> attend -> observe: the one call a decode loop or a prefill chunk makes.

How each policy relates to its paper and to kvpress (``KVCompressionConfig.scoring`` picks the variant;
rankings are what matters, so a sum and a mean over the same set are the same variant):

- ``"streaming"`` (StreamingLLM): the first ``sink`` and the last ``window`` positions; no score. kvpress's
  StreamingLLMPress keeps the same set (``n_sink`` = ``sink``, the rest of the budget the newest tokens).
- ``"snapkv"`` (SnapKV, as published and as kvpress's SnapKVPress; every ``scoring`` is this one): each of the
  last ``obs_window`` real queries attends over all keys (its softmax includes the window, causal inside it);
  the window's own columns are then dropped (they neither vote nor lend votes to neighbours through the
  pooling); the vote is the mean over the window queries and over the G query heads of each kv head,
  average-pooled along the remaining keys in position order (``pool_kernel``, zero padding counted as in
  torch's ``avg_pool1d(padding=kernel // 2)``); the top scorers are kept and the window is kept
  unconditionally. Padding queries never vote, and the window is the last ``obs_window`` real queries even
  when it spans several prefill chunks (``KVCache.votes`` carries their rows), so the kept set does not depend
  on the chunk size as long as no compression fires inside the prompt (capacity >= prompt; then ``compress``
  once, as SnapKV does). A compression inside the prompt or during decode (every ``slack`` steps) votes with
  the latest ``obs_window`` queries (an extension: SnapKV compresses once). kvpress pools per query head and
  then averages the group; for ``pool="avg"`` that is the same score (pooling is linear), ``pool="max"`` is
  not in kvpress. Memory: the window rows cost ``obs_window * C`` float32 per (batch row, kv head).
- ``"h2o"`` (Heavy-Hitter Oracle): every real query adds its attention to each key's score. ``"gqa"`` and
  ``"published"``: the accumulated sum (H2O, per head; here per kv head, summed over its G query heads).
  ``"kvpress"`` (ObservedAttentionPress): the sum divided by the number of queries that could see the key
  (``newest - position + 1``: every query since the key arrived), averaged over the group; this favours
  recent keys less than the raw sum favours old ones.
- ``"tova"`` (Token Omission Via Attention): the attention of the latest real query. ``"gqa"``: per kv head
  (summed over its G query heads), each kv head keeps its own set. ``"published"`` and ``"kvpress"``
  (TOVAPress): averaged over every query head of the layer, one kept set shared by all kv heads (their slots
  stay aligned because every compression applies the same ranking to each head); with :class:`HeadClasses`
  the average runs over each class's heads. Published TOVA drops one token per step: ``slack=1``; kvpress
  always keeps the latest token: ``window >= 1``.

Budgets: ``budget`` counts every kept slot, window included (kvpress's
``int(q_len * (1 - compression_ratio))``); ``ratio`` rounds up (``ceil(ratio * context_len)``), so to
reproduce kvpress exactly give it the absolute ``budget``, and ``sink=0`` (kvpress's scorer presses have no
sinks) and ``window <= obs_window`` for SnapKV.
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
    votes = (jnp.zeros((batch, kv_heads, config.obs_window, capacity), jnp.float32)
             if config.policy == "snapkv"
             else None)
    return dataclasses.replace(cache, length=jnp.asarray(config.reserved, jnp.int32), votes=votes)


def _pool(x, kernel: int, kind: str):
    """Centred 1-D pooling along slots (SnapKV's clustering), ``x [B, K, C]``; zero padding counted (torch's
    ``avg_pool1d`` default ``count_include_pad=True``), max pooling ignores the padding."""
    pad = [(0, 0), (0, 0), (kernel // 2, kernel // 2)]
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), pad)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), pad) / kernel


def _pool_keys(vote, member, pos, kernel: int, kind: str):
    """Pools ``vote [B, K, C]`` along the *sequence of member keys in position order*, ignoring other slots.

    Empty, padding, reserved and observation-window slots are not part of the sequence: a key's neighbours are
    the previous and next member keys, and past the ends there is zero padding, exactly as kvpress pools the
    ``q_len - window`` non-window columns. Non-members get 0.
    """
    order = jnp.argsort(jnp.where(member, pos, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
    seq = jnp.take_along_axis(jnp.where(member, vote, 0.0), order, -1)  # members first, in position order
    pooled = _pool(seq, kernel, kind)
    back = jnp.zeros_like(pooled).at[_bk_index(order)].set(pooled)
    return jnp.where(member, back, 0.0)


def _newest(pos):
    """``int32 [B, K, 1]``: the newest position held per (batch row, kv head)."""
    return jnp.max(pos, axis=-1, keepdims=True)


def _real(rows, positions):
    """``bool [B, K, T]``: real queries (a query that sees no key is padding when positions are not given)."""
    if positions is None:
        return rows.sum(-1) > 0
    return jnp.broadcast_to((jnp.asarray(positions) >= 0)[:, None, :], rows.shape[:3])


def _latest_real(rows, positions):
    """``([B, K, C], bool [B, K, 1])``: the row of ``rows [B, K, T, C]`` of the latest real query, and whether
    there is one (a finished batch row decodes padding only)."""
    real = _real(rows, positions)
    last = rows.shape[2] - 1 - jnp.argmax(real[..., ::-1], axis=-1)
    return jnp.take_along_axis(rows, last[..., None, None], axis=2)[:, :, 0], real.any(-1, keepdims=True)


def _window_rows(rows, positions, w: int):
    """``bool [B, K, T]``: the real queries among the last ``w`` real positions of this call."""
    if positions is None:
        real = _real(rows, None)
        after = jnp.cumsum(real[..., ::-1], axis=-1)[..., ::-1]  # real rows at or after t
        return real & (after <= w)
    p = jnp.asarray(positions, jnp.int32)
    last = jnp.max(p, axis=1, keepdims=True)
    use = (p >= 0) & (p > last - w)
    return jnp.broadcast_to(use[:, None, :], rows.shape[:3])


def _record_votes(cache: KVCache, rows, positions, w: int) -> KVCache:
    """Writes the rows ``[B, K, T, C]`` of this call's last ``w`` real queries into ``cache.votes`` (row p %
    w)."""
    p = jnp.asarray(positions, jnp.int32)  # [B, T]
    use = _window_rows(rows, p, w)[:, 0]  # [B, T]: at most w rows, distinct positions mod w
    slot = jnp.where(use, p % w, w)  # w: dropped
    b, k, t, _ = rows.shape
    assert cache.votes is not None, "callers check cache.votes first (observe)"
    idx = (jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None],
           jnp.broadcast_to(slot[:, None, :], (b, k, t)))
    return dataclasses.replace(cache, votes=cache.votes.at[idx].set(rows, mode="drop"))


def observe(cache: KVCache, probs, config: KVCompressionConfig, positions=None) -> KVCache:
    """Folds attention probabilities ``float32 [B, K, G, T, C]`` into the cache per the policy.

    ``positions int [B, T]``: the queries' positions (-1: padding, never votes). Required for SnapKV on a
    cache from :func:`init_for` (its observation window is indexed by position); without them a query that
    sees no key counts as padding.
    """
    if config.policy in ("none", "streaming"):
        return cache
    if probs.shape[:2] != cache.pos.shape[:2] or probs.shape[-1] != cache.capacity or probs.ndim != 5:
        raise ValueError(f"probs must be [B, K, G, T, C={cache.capacity}] from attend(return_probs=True), "
                         f"got {probs.shape}")
    if positions is not None and jnp.shape(positions) != (probs.shape[0], probs.shape[3]):
        raise ValueError(f"positions must be [B={probs.shape[0]}, T={probs.shape[3]}] "
                         "(the queries of probs), "
                         f"got {jnp.shape(positions)}")
    rows = probs.mean(2)  # [B, K, T, C]: averaged over the G query heads of each kv head
    if config.policy == "h2o":
        # gqa/published keep the sum over the group (ranked per kv head, the same order as the mean)
        received = rows if config.scoring == "kvpress" else probs.sum(2)
        return dataclasses.replace(cache, score=cache.score + received.sum(2))
    if config.policy == "tova":
        if config.scoring == "gqa":
            score, seen = _latest_real(probs.sum(2), positions)
        else:  # published TOVA / kvpress TOVAPress: the mean over every query head of the layer
            score, seen = _latest_real(rows, positions)
            score = jnp.broadcast_to(score.mean(1, keepdims=True), cache.score.shape)
        return dataclasses.replace(cache, score=jnp.where(seen, score, cache.score))
    # snapkv
    w = config.obs_window
    if cache.votes is not None:
        if positions is None:
            raise ValueError("observe: SnapKV needs the queries' positions to index its observation window "
                             "(policies.step passes them)")
        if cache.votes.shape[2] != w:
            raise ValueError(f"cache.votes holds {cache.votes.shape[2]} window rows "
                             f"but obs_window={w}; build "
                             "the cache with init_for(config, ...) of this config")
        return _record_votes(cache, rows, positions, w)
    # A cache without window rows (init_cache, the quantized store): one call's window votes, replaced by the
    # next prompt chunk and accumulated by decode steps. Exact only when the whole prompt is one call.
    use = _window_rows(rows, positions, w)
    vote = (rows * use[..., None]).sum(2)
    score = jnp.where(use.any(-1, keepdims=True), vote,
                      cache.score) if probs.shape[3] > 1 else cache.score + vote
    return dataclasses.replace(cache, score=score)


def _snapkv_scores(cache: KVCache, config: KVCompressionConfig, member):
    """SnapKV's pooled vote ``[B, K, C]`` over the member (non-window, valid, non-reserved) slots."""
    if cache.votes is None:
        vote = cache.score
    else:
        written = (cache.votes.sum(-1) > 0).sum(-1, keepdims=True)  # [B, K, 1]: window queries seen so far
        vote = cache.votes.sum(2) / jnp.maximum(written, 1)
    return _pool_keys(vote, member, cache.pos, config.pool_kernel, config.pool)


def slot_scores(cache: KVCache, config: KVCompressionConfig):
    """``float32 [B, K, C]`` ranking: higher is kept; protected +3e38, empty/reserved -inf."""
    pos = cache.pos
    valid = pos >= 0
    newest = _newest(pos)
    reserved = jnp.arange(cache.capacity) < config.reserved
    recent = pos > newest - config.recent
    if config.policy == "streaming":
        base = pos.astype(jnp.float32)
    elif config.policy == "snapkv":
        obs = pos > newest - config.obs_window
        base = _snapkv_scores(cache, config, valid & ~obs & ~reserved)
    elif config.policy == "h2o" and config.scoring == "kvpress":
        base = cache.score / jnp.maximum(newest - pos + 1, 1).astype(jnp.float32)
    else:
        base = cache.score
    protected = (pos < config.sink) | recent
    s = jnp.where(protected, _PROTECT, base)
    s = jnp.where(valid, s, -jnp.inf)
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
    return out, observe(cache, probs, config, positions)
