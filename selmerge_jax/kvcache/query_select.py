"""Query-aware block selection at decode time: the select-and-merge rule applied to the cache.

The cache's C slots are cut into R = C / W regions of W consecutive slots (slots are filled in position order,
and compaction keeps that order, so a region is a run of nearby positions). Each region is summarised by the
count-weighted mean of its valid keys; the current queries (mean over the T queries and the G query heads of a
kv head: one selection per kv head, GQA-native) score the summaries by dot product; the top M regions, plus
forced sink and local regions, are attended exactly. Optionally every unselected non-empty region is also
attended through one centroid token (mean K, mean V, ``log(count)`` on its logit), as in the training-time
algorithm. With a :class:`BlockIndex` kept up to date by :func:`refresh_index` (O(T + W) per step; rebuild
with :func:`build_index` after a compression), a decode step reads ``R`` summaries and ``M * W`` slots instead
of all C slots.

:func:`ms_plan_rows` and :func:`attend_plan_row` are the other decode rule: the training-time select-and-merge
plan itself (``attention.selection.decode_plan_rows``, built by the same ``plan_rows`` as training and the
ring), so a decoded token attends exactly the regions it attended in training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.attention.selection import decode_plan_rows
from selmerge_jax.kernels.selective_decode import resolve, selective_decode
from selmerge_jax.kvcache.cache import KVCache, attend_segments, attend_slots
from selmerge_jax.validation import fail, is_int

__all__ = ["BlockIndex", "attend_plan_row", "attend_selected", "build_index", "ms_plan_rows", "refresh_index",
           "region_summaries", "select_blocks"]


def region_summaries(cache: KVCache, block: int):
    """Per region: mean key/value ``float32 [B, K, R, H]``, token count ``[B, K, R]``, newest position
    ``[B, K, R]``."""
    b, kh, c, h = cache.k.shape
    if not is_int(block) or block <= 0 or c % block:
        fail("block", block, f"a positive divisor of the cache capacity C={c}")
    r = c // block
    w = jnp.where(cache.pos >= 0, cache.count, 0.0).reshape(b, kh, r, block)
    n = w.sum(-1)
    denom = jnp.maximum(n, 1e-30)[..., None]
    mean = lambda x: jnp.einsum("bkrw,bkrwh->bkrh", w,
                                x.astype(jnp.float32).reshape(b, kh, r, block, h)) / denom
    return mean(cache.k), mean(cache.v), n, cache.pos.reshape(b, kh, r, block).max(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockIndex:
    """Region summaries of a cache (:func:`region_summaries`), carried between decode steps, stored as the
    decode kernel reads them: the mean key/value in the cache's dtype (a centroid is attended in that dtype
    anyway; float32 summaries cost a conversion and twice the reads every step) and R' >= R rows, padded
    (count 0, position -1) to what the kernel tiles (:func:`index_rows`). Row ``r`` is region ``r``."""

    k_mean: jax.Array  # cache dtype [B, K, R', H]
    v_mean: jax.Array  # cache dtype [B, K, R', H]
    n: jax.Array  # float32 [B, K, R']
    newest: jax.Array  # int32 [B, K, R']
    block: int = dataclasses.field(metadata=dict(static=True))  # slots per region

    def regions(self, capacity: int) -> int:
        return capacity // self.block

    def as_slots(self, capacity: int):
        """The ``R`` centroids as a cache's slot store ``(k, v, pos, count)`` (the padding rows dropped)."""
        r = self.regions(capacity)
        return self.k_mean[:, :, :r], self.v_mean[:, :, :r], self.newest[..., :r], self.n[..., :r]


def index_rows(r: int) -> int:
    """Rows of an index over ``r`` regions: a power of two >= 16 up to 128, then a multiple of 128, and of
    8 x 128 beyond that, so the decode kernel walks the centroids in tiles of 128 over 8 programs per kv
    head (``kernels.selective_decode.pallas_triton.centroid_tile``)."""
    if r <= 128:
        return max(16, 1 << (r - 1).bit_length())
    tiles = -(-r // 128)
    return 128 * (tiles if tiles <= 8 else -(-tiles // 8) * 8)


def _fields(index: BlockIndex):
    # Not dataclasses.astuple: it deep-copies its leaves, which would copy (or fail on) jax arrays.
    return index.k_mean, index.v_mean, index.n, index.newest


def _stored(summaries, rows: int, dtype) -> tuple:
    """``region_summaries``' output as an index stores it: K/V means in ``dtype``, padded to ``rows``."""
    k_mean, v_mean, n, newest = summaries
    pad = lambda x, fill: jnp.pad(x, [(0, 0)] * 2 + [(0, rows - x.shape[2])] + [(0, 0)] * (x.ndim - 3),
                                  constant_values=fill)
    return pad(k_mean.astype(dtype), 0), pad(v_mean.astype(dtype), 0), pad(n, 0), pad(newest, -1)


def build_index(cache: KVCache, block: int) -> BlockIndex:
    """Summaries of every region, from scratch (O(C)): after init, prefill or a compression."""
    summaries = region_summaries(cache, block)
    rows = index_rows(summaries[2].shape[-1])
    k_mean, v_mean, n, newest = _stored(summaries, rows, cache.k.dtype)
    return BlockIndex(k_mean, v_mean, n, newest, block)


def refresh_index(index: BlockIndex, cache: KVCache, start, t: int) -> BlockIndex:
    """Recomputes the regions touched by ``t`` slots written from slot ``start`` (traced ok; ``t`` static).

    The window of regions is static (``ceil((t - 1) / W) + 1``) and its first region is clamped to
    ``[0, R - window]`` here, which is what ``dynamic_slice`` would do to the cache slice; the update must use
    the same clamp, because ``dynamic_update_slice`` into the padded index (R' >= R rows) would clamp to
    ``R' - window`` instead. So recomputed and rewritten regions always coincide.
    """
    block = index.block
    r = index.regions(cache.capacity)
    nr = min(r, -(-(t - 1) // block) + 1)
    r0 = jnp.clip(jnp.asarray(start, jnp.int32) // block, 0, r - nr)  # both clamps, made explicit
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, r0 * block, nr * block, axis=2)
    part = KVCache(k=sl(cache.k), v=sl(cache.v), pos=sl(cache.pos), count=sl(cache.count),
                   score=sl(cache.score),
                   length=cache.length, dropped=cache.dropped)
    fresh = _stored(region_summaries(part, block), nr, cache.k.dtype)
    put = lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src.astype(dst.dtype), r0, axis=2)
    k_mean, v_mean, n, newest = (put(d, s) for d, s in zip(_fields(index), fresh, strict=True))
    return BlockIndex(k_mean, v_mean, n, newest, block)


def _index(cache: KVCache, block: int, index: BlockIndex | None) -> BlockIndex:
    if index is None:
        return build_index(cache, block)
    if index.block != block:
        fail("index.block", index.block, f"the block the step selects with ({block})")
    return index


def select_blocks(cache: KVCache, q, *, block: int, top_m: int, sink_blocks: int = 1, local_blocks: int = 1,
                  index: BlockIndex | None = None):
    """``int32 [B, K, M]``: regions to attend, sorted; sinks (first regions) and the newest regions forced.
    Regions are scored against the index's summaries, which are rounded to the cache dtype."""
    if not is_int(block) or block <= 0 or cache.capacity % block:
        fail("block", block, f"a positive divisor of the cache capacity C={cache.capacity}")
    r = cache.capacity // block
    if not is_int(top_m) or not 0 < top_m <= r:
        fail("top_m", top_m, f"an int in [1, R={r}] (R = C / block)")
    if sink_blocks + local_blocks > top_m:
        raise ValueError(f"sink_blocks={sink_blocks} + local_blocks={local_blocks} exceed top_m={top_m}")
    ks, _, _, n = _index(cache, block, index).as_slots(cache.capacity)
    b, t, _nh, h = q.shape
    qs = q.astype(jnp.float32).reshape(b, t, cache.kv_heads, -1, h).mean((1, 3))  # [B, K, H]
    score = jax.lax.stop_gradient(jnp.einsum("bkh,bkrh->bkr", qs, ks.astype(jnp.float32)))
    region = jnp.arange(r)
    newest = (jnp.maximum(cache.length, 1) - 1) // block
    forced = (region < sink_blocks) | ((region > newest - local_blocks) & (region <= newest))
    score = jnp.where(n > 0, score, -jnp.inf)
    score = jnp.where(forced, jnp.inf, score)
    _, idx = jax.lax.top_k(score, top_m)
    return jnp.sort(idx, -1).astype(jnp.int32)


def attend_selected(cache: KVCache, q, q_positions, *, block: int, top_m: int, sink_blocks: int = 1,
                    local_blocks: int = 1, centroids: bool = False, scale: float | None = None,
                    index: BlockIndex | None = None, return_probs: bool = False, kernel: str = "xla"):
    """Attention of q ``[B, T, N, H]`` over the top ``top_m`` regions of the cache (and, with ``centroids``,
    one merged token per unselected region). With ``top_m == C / block`` it equals :func:`cache.attend`.
    ``index`` (kept current with :func:`refresh_index`) avoids recomputing every region summary.

    This is the pure-jnp reference of a selective decode kernel: ``select_blocks`` (R summaries) gives the
    block list, then exact attention reads ``top_m * block`` slots (+ R centroids); a GPU kernel takes the
    same block list and reads the same slots. ``return_probs`` also returns the probabilities of the cache's
    own slots ``float32 [B, K, G, T, C]`` (0 for unselected slots; centroid mass not included), what the
    scoring policies fold in (``policies.observe``).

    ``kernel`` (``DecodeSelection.kernel``): ``"xla"`` this reference; ``"pallas_triton"`` a one-token step
    attends its blocks in place with ``kernels.selective_decode``, the centroids in the same launch and
    softmax; ``"auto"``: the kernel on a GPU where it tiles the shapes
    (``kernels.selective_decode.resolve``)."""
    index = _index(cache, block, index)
    regions = select_blocks(cache, q, block=block, top_m=top_m, sink_blocks=sink_blocks,
                            local_blocks=local_blocks, index=index)
    b, t, n_heads, h = q.shape
    kh = cache.kv_heads
    rows = index.n.shape[-1] if centroids else None
    impl = resolve(kernel, (b, kh, n_heads // kh, h), block, name="kernel", centroid_rows=rows)
    if impl == "pallas_triton" and t == 1 and not return_probs:
        return _attend_blocks_in_place(cache, q, q_positions, regions, block, index if centroids else None,
                                       scale)
    rest = []
    if centroids:
        ks, vs, newest, n = index.as_slots(cache.capacity)
        chosen = jnp.zeros(n.shape, bool).at[_bk(regions)].set(True)
        n = jnp.where(chosen, 0.0, n)  # selected regions are already attended token by token
        # A second segment of one softmax, not a concatenation: the R centroids are read where they are
        # instead of being copied beside the selected slots every step.
        rest.append((ks, vs, jnp.where(n > 0, newest, -1), n))
    slots = (regions[..., None] * block + jnp.arange(block)).reshape(*regions.shape[:2], -1)  # [B, K, M*W]
    take = lambda x: jnp.take_along_axis(x, slots, axis=2)
    take4 = lambda x: jnp.take_along_axis(x, slots[..., None], axis=2)
    segments = [(take4(cache.k), take4(cache.v), take(cache.pos), take(cache.count)), *rest]
    if not return_probs:
        return attend_segments(q, q_positions, segments, scale=scale)
    out, probs, _ = attend_segments(q, q_positions, segments, scale=scale, return_probs=True)
    b, kh, g, t, _ = probs.shape
    tokens = probs[..., :slots.shape[-1]]  # [B, K, G, T, M*W]: the selected slots, centroids dropped
    full = jnp.zeros((b, kh, g, t, cache.capacity), jnp.float32)
    bi, ki = jnp.arange(b)[:, None, None, None, None], jnp.arange(kh)[None, :, None, None, None]
    gi, ti = jnp.arange(g)[None, None, :, None, None], jnp.arange(t)[None, None, None, :, None]
    return out, full.at[bi, ki, gi, ti, slots[:, :, None, None, :]].set(tokens)


def _attend_blocks_in_place(cache: KVCache, q, q_positions, regions, block: int, index: BlockIndex | None,
                            scale):
    """One decode token ``q [B, 1, N, H]``: the selected blocks (read in the cache, never gathered) and, with
    an ``index``, the other blocks' centroids, in one softmax of one ``kernels.selective_decode`` call."""
    b, _, n, h = q.shape
    kh = cache.kv_heads
    # the padded store as it is (its padding rows have count 0): the kernel tiles R' rows, not R
    centroids = None if index is None else (index.k_mean, index.v_mean, index.newest, index.n)
    out, _ = selective_decode(q.reshape(b, kh, n // kh, h), cache.k, cache.v, cache.pos, cache.count,
                              regions, q_positions[:, 0], block=block, scale=scale, centroids=centroids,
                              implementation="pallas_triton")
    return out.reshape(b, 1, n, h).astype(q.dtype)


def _bk(idx):
    b, k, _ = idx.shape
    return jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], idx


def ms_plan_rows(cache: KVCache, previous_summary, positions, config: MSAttentionConfig):
    """``int32 [B, P, M]``: the training plan's row for the group of each row's decode position ``int [B]``.

    ``previous_summary`` ``[B, P, H]``: ``attention.selection.query_summaries`` of the queries of the region
    before the group (the decode loop keeps it). Needs an uncompressed cache (slot = position) whose capacity
    is a multiple of ``config.block_size``; see ``attention.selection.decode_plan_rows``.
    """
    if cache.capacity % config.block_size:
        fail("cache.capacity", cache.capacity,
             f"a multiple of MSAttentionConfig.block_size={config.block_size}")
    return decode_plan_rows(previous_summary, jnp.swapaxes(cache.k, 1, 2), positions, config)


def attend_plan_row(cache: KVCache, q, q_positions, rows, config: MSAttentionConfig, *,
                    scale: float | None = None):
    """Attention of q ``[B, T, N, H]`` at ``q_positions`` ``int [B, T]`` (all in one query group per row) over
    the plan ``rows`` ``[B, P, M]`` (:func:`ms_plan_rows`) plus the group's own ``merge`` regions, causally by
    stored position. With slot = position this equals ``ms_attention``'s output at those positions
    (``centroids=False``). P = N (one selection per query head) attends each query head to its own slots."""
    b, kh, _, _ = cache.k.shape
    w, merge, p = config.block_size, config.merge, rows.shape[1]
    start = (jnp.asarray(q_positions)[:, 0] // config.group_tokens) * merge  # [B]: the group's first region
    local = jnp.broadcast_to((start[:, None] + jnp.arange(merge))[:, None], (b, p, merge))
    regions = jnp.concatenate([rows, local.astype(rows.dtype)], -1)  # [B, P, M + merge]
    ok = jnp.repeat(regions >= 0, w, -1)
    slots = (jnp.maximum(regions, 0)[..., None] * w + jnp.arange(w)).reshape(b, p, -1)  # [B, P, (M+merge)*W]
    heads = (jnp.arange(p) * kh // p)[None, :, None]  # selection head -> kv head
    take = lambda x: x[jnp.arange(b)[:, None, None], heads, slots]
    pos = jnp.where(ok, take(cache.pos), -1)
    count = jnp.where(ok, take(cache.count), 0.0)
    return attend_slots(q, q_positions, take(cache.k), take(cache.v), pos, count, scale=scale)
