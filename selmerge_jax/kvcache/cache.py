"""A static-shape, GQA-native KV cache: one pytree per layer, slots stored per kv head.

Layout (shape letters from ``selmerge_jax.typing``; C = capacity in slots):

- ``k``, ``v``: ``[B, K, C, H]``. Stored per *kv* head, never expanded to N query heads: a GQA model with K kv
  heads holds exactly ``B * K * C * H`` elements per tensor (the trap SnapKV/KVCache-Factory fell into).
- ``pos``: ``int32 [B, K, C]``, the token position each slot holds, ``-1`` when empty. Per kv head, because
  eviction policies keep different tokens in different heads. Causality is decided by stored position, never
  by slot index, so slots may be reordered or compacted freely.
- ``count``: ``float32 [B, K, C]``, how many tokens a slot stands for: 0 empty, 1 a plain token, n > 1 a
  merged slot (mean K/V of n tokens). Attention adds ``log(count)`` to the logit, so a merged slot receives
  the softmax mass its n members would have received if their keys were equal (ToMe's proportional attention).
- ``score``: ``float32 [B, K, C]``, the policy statistic carried between steps (e.g. H2O's accumulated
  attention).
- ``length``: ``int32 []``, the write cursor: slots ``[0, length)`` have been written (valid or padding).
- ``dropped``: ``int32 []``, tokens that did not fit (overflow under ``jit``; see :func:`append`).
- ``votes``: ``float32 [B, K, W, C]`` or ``None``: SnapKV's observation window, the attention rows (mean over
  the G query heads of each kv head) of the last W real queries, row ``p % W`` holding the query at position
  p; its columns move with the slots (:func:`gather_slots`). Only ``policies.init_for`` with
  ``policy="snapkv"`` allocates it (W = ``obs_window``); everywhere else it is ``None`` (no leaves).

Everything here is a pure function of arrays; shapes never depend on values, so a decode loop compiles once.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from selmerge_jax.validation import check_positive_int

__all__ = [
    "KVCache",
    "append",
    "attend",
    "attend_segments",
    "attend_slots",
    "gather_slots",
    "init_cache",
    "kv_nbytes",
    "nbytes",
    "num_valid",
    "valid_mask",
    "with_capacity",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer KV cache pytree (see the module docstring for the meaning of each field)."""

    k: jax.Array  # [B, K, C, H]
    v: jax.Array  # [B, K, C, H]
    pos: jax.Array  # int32 [B, K, C], -1 empty
    count: jax.Array  # float32 [B, K, C]
    score: jax.Array  # float32 [B, K, C]
    length: jax.Array  # int32 []
    dropped: jax.Array  # int32 []
    votes: jax.Array | None = None  # float32 [B, K, W, C]: SnapKV window rows (policies.init_for), else None

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]


def init_cache(batch: int, kv_heads: int, capacity: int, head_dim: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache with ``capacity`` slots per (batch row, kv head)."""
    b, kh, c, h = (check_positive_int(n, x) for n, x in
                   (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity), ("head_dim", head_dim)))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    # k and v must be distinct buffers: a decode step donates the cache, and XLA refuses to donate one twice.
    return KVCache(k=jnp.zeros((b, kh, c, h), dtype), v=jnp.zeros((b, kh, c, h), dtype),
                   pos=jnp.full((b, kh, c), -1, jnp.int32),
                   count=jnp.zeros((b, kh, c), jnp.float32), score=jnp.zeros((b, kh, c), jnp.float32),
                   length=jnp.zeros((), jnp.int32), dropped=jnp.zeros((), jnp.int32))


def valid_mask(cache: KVCache) -> jax.Array:
    """``bool [B, K, C]``: slots holding a real token (or a merge of real tokens)."""
    return cache.pos >= 0


def num_valid(cache: KVCache) -> jax.Array:
    """``int32 [B, K]``: valid slots per (batch row, kv head)."""
    return valid_mask(cache).sum(-1, dtype=jnp.int32)


def _check_new(cache: KVCache, k_new, v_new, positions) -> int:
    b, kh, _, h = cache.k.shape
    if getattr(k_new, "ndim", None) != 4 or k_new.shape[0] != b or k_new.shape[2:] != (kh, h):
        raise ValueError(f"k_new must be [B={b}, T, K={kh}, H={h}], got {jnp.shape(k_new)}")
    if jnp.shape(v_new) != k_new.shape:
        raise ValueError(f"v_new must match k_new {k_new.shape}, got {jnp.shape(v_new)}")
    t = k_new.shape[1]
    if jnp.shape(positions) != (b, t) or not jnp.issubdtype(jnp.asarray(positions).dtype, jnp.integer):
        raise ValueError(f"positions must be int [B={b}, T={t}], got {jnp.shape(positions)} "
                         f"{getattr(positions, 'dtype', type(positions))}")
    if t > cache.capacity:
        raise ValueError(f"cannot append T={t} tokens to a cache of capacity C={cache.capacity}")
    return t


def _concrete_or_none(x) -> int | None:
    """The int value of a concrete scalar, or None under tracing (version-proof: no jax.core.Tracer
    import)."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def append(cache: KVCache, k_new, v_new, positions) -> KVCache:
    """Writes ``k_new``/``v_new`` ``[B, T, K, H]`` at positions ``int [B, T]`` into slots
    ``[length, length+T)``.

    A negative position marks a padding token: it takes a slot but is never attended (count 0).

    Overflow: when ``length + T > C`` and the cursor is concrete (eager call), a ``ValueError`` is raised.
    Under ``jit`` the cursor is a tracer, so the tokens that do not fit are dropped (the
    window write is clamped to the end), ``dropped`` counts them, and callers can check it afterwards
    (``int(cache.dropped) == 0``). Policies avoid overflow by compressing before appending
    (``policies.make_room``).
    """
    t = _check_new(cache, k_new, v_new, positions)
    length = _concrete_or_none(cache.length)
    if length is not None and length + t > cache.capacity:
        raise ValueError(f"cache overflow: length={length} + T={t} > capacity C={cache.capacity}; "
                         "compress first (kvcache.make_room) or allocate a larger cache")
    positions = jnp.asarray(positions, jnp.int32)
    pos_new = jnp.broadcast_to(positions[:, None, :], (cache.batch, cache.kv_heads, t))  # [B, K, T]
    # A plain dynamic_update_slice of a T-slot window, so XLA updates the (donated) cache in place. A scatter
    # with mode="drop" lowers to select(in_bounds, update, old) over the *whole* cache: a full read and write
    # of K and V per decode step. The window starts at min(length, C - T); on overflow its first slots are old
    # ones (written back unchanged) and the tokens past the end are dropped.
    start = jnp.minimum(cache.length, cache.capacity - t)
    # [T]: token written to window row j, < 0: old
    src = start + jnp.arange(t, dtype=jnp.int32) - cache.length
    fresh = src >= 0
    take = jnp.clip(src, 0, t - 1)

    def write(dst, new):  # dst [B, K, C, ...], new [B, K, T, ...]
        old = jax.lax.dynamic_slice_in_dim(dst, start, t, axis=2)
        rows = jnp.take(new.astype(dst.dtype), take, axis=2)
        sel = fresh.reshape((1, 1, t) + (1,) * (dst.ndim - 3))
        return jax.lax.dynamic_update_slice_in_dim(dst, jnp.where(sel, rows, old), start, axis=2)

    overflow = jnp.maximum(cache.length + t - cache.capacity, 0)
    return dataclasses.replace(
        cache,
        k=write(cache.k, k_new.transpose(0, 2, 1, 3)),
        v=write(cache.v, v_new.transpose(0, 2, 1, 3)),
        pos=write(cache.pos, pos_new),
        count=write(cache.count, (pos_new >= 0).astype(jnp.float32)),
        score=write(cache.score, jnp.zeros_like(pos_new, jnp.float32)),
        length=jnp.minimum(cache.length + t, cache.capacity),
        dropped=cache.dropped + overflow,
    )


def attend_slots(q, q_positions, k, v, pos, count, *, scale: float | None = None, return_probs: bool = False,
                 window: int | None = None):
    """Attention of q ``[B, T, N, H]`` over slots k/v ``[B, K, C, H]`` with per-slot ``pos``/``count``
    ``[B, K, C]``.

    Query t sees slot c iff ``0 <= pos[c] <= q_positions[t]`` (causal by stored position) and ``count > 0``;
    with a sliding ``window`` W also ``pos[c] > q_positions[t] - W`` (Mistral's convention: W tokens including
    the query itself), decided per query, so a chunk of a prompt longer than the window is exact.
    Scores are computed per kv head on ``[B, K, G, T, C]`` without repeating K/V; softmax in float32 with
    ``log(count)`` added to each logit. The value product runs in the cache dtype when q has it (probabilities
    rounded to that dtype, as flash attention does): a float32 copy of a bf16 V would be written and read
    again every decode step. Returns ``out [B, T, N, H]`` (q's dtype; rows that see nothing give 0),
    and with ``return_probs`` also ``probs float32 [B, K, G, T, C]`` and ``lse float32 [B, T, N]``.
    """
    return attend_segments(q, q_positions, [(k, v, pos, count)], scale=scale, return_probs=return_probs,
                           window=window)


def attend_segments(q, q_positions, segments, *, scale: float | None = None, return_probs: bool = False,
                    window: int | None = None):
    """:func:`attend_slots` over several slot stores at once, one softmax across all of them.

    ``segments``: a sequence of ``(k, v, pos, count)``, each ``[B, K, C_i, H]`` / ``[B, K, C_i]`` (e.g. a
    quantized store's dequantized slots and a float window). Equal to ``attend_slots`` on their concatenation
    along slots, without ever concatenating K or V (only the small float32 logits are joined); ``probs`` come
    back concatenated ``[B, K, G, T, sum C_i]`` in segment order.
    """
    b, t, n, h = q.shape
    if not segments:
        raise ValueError("segments must hold at least one (k, v, pos, count) store")
    kh = segments[0][0].shape[1]
    if n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh}")
    for i, (k, v, pos, count) in enumerate(segments):
        if k.ndim != 4 or k.shape[1] != kh or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q {q.shape} does not match cache slots {k.shape} on "
                             "batch, kv heads or head dim")
        if jnp.shape(v) != k.shape or jnp.shape(pos) != k.shape[:3] or jnp.shape(count) != k.shape[:3]:
            # pos/count of [B, K, 1] would broadcast over every slot instead of failing
            raise ValueError(f"segment {i}: v must match k {k.shape} and pos, count must "
                             f"be {k.shape[:3]}; got v "
                             f"{jnp.shape(v)}, pos {jnp.shape(pos)}, count {jnp.shape(count)}")
    if jnp.shape(q_positions) != (b, t):
        raise ValueError(f"q_positions must be [B={b}, T={t}], got {jnp.shape(q_positions)}")
    check_positive_int("window", window, allow_none=True)
    g = n // kh
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qg = q.reshape(b, t, kh, g, h)
    qp = jnp.asarray(q_positions, jnp.int32)[:, None, :, None]  # [B, 1, T, 1]

    def seg_logits(k, pos, count):
        logits = jnp.einsum("btkgh,bkch->bkgtc", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
        logits = logits * scale + jnp.log(jnp.maximum(count, 1e-30))[:, :, None, None, :]
        sp = pos[:, :, None, :]  # [B, K, 1, C]
        mask = (sp >= 0) & (count > 0)[:, :, None, :] & (sp <= qp)
        if window is not None:
            mask = mask & (sp > qp - window)
        mask = mask[:, :, None]  # [B, K, 1, T, C]
        return jnp.where(mask, logits, -jnp.inf), mask

    parts = [seg_logits(k, pos, count) for k, _, pos, count in segments]
    logits = jnp.concatenate([lg for lg, _ in parts], -1)  # one segment: a no-op under jit
    mask = jnp.concatenate([mk for _, mk in parts], -1)
    m = jnp.max(logits, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows that see nothing: avoid inf - inf
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    probs = p / jnp.where(denom == 0, 1.0, denom)
    out, start = None, 0
    for _, v, pos, _ in segments:
        c = pos.shape[-1]
        part = _value_product(probs[..., start:start + c], v, q.dtype)
        out = part if out is None else out + part
        start += c
    out = out.reshape(b, t, n, h).astype(q.dtype)
    if not return_probs:
        return out
    lse = jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)  # [B, K, G, T]
    return out, probs, lse.transpose(0, 3, 1, 2).reshape(b, t, n)


def _value_product(probs, v, dtype):
    """``probs float32 [B, K, G, T, C]`` x ``v [B, K, C, H]`` -> ``[B, T, K, G, H]``."""
    if v.dtype == dtype:
        # In the cache dtype (XLA accumulates bf16 dots in float32 on GPU/TPU); the result is rounded to q's
        # dtype anyway. (An explicit float32 result type fails on XLA:CPU: "Unsupported element type for
        # DotThunk".)
        return jnp.einsum("bkgtc,bkch->btkgh", probs.astype(v.dtype), v)
    return jnp.einsum("bkgtc,bkch->btkgh", probs, v.astype(jnp.float32))  # mixed dtypes (rare): exact float32


def attend(cache: KVCache, q, q_positions, *, scale: float | None = None, return_probs: bool = False,
           window: int | None = None):
    """Attention of q ``[B, T, N, H]`` at positions ``int [B, T]`` over the cache (see :func:`attend_slots`).

    The usual decode step is ``cache = append(cache, k, v, pos); out = attend(cache, q, pos)``: the new tokens
    see themselves and everything before them (within ``window`` positions when set). ``return_probs=True``
    also returns the float32 attention probabilities ``[B, K, G, T, C]`` and ``lse [B, T, N]``, which scoring
    policies (H2O, TOVA, SnapKV) reduce.
    """
    return attend_slots(q, q_positions, cache.k, cache.v, cache.pos, cache.count, scale=scale,
                        return_probs=return_probs, window=window)


def kv_nbytes(cache: KVCache) -> int:
    """Bytes of the K and V storage alone: ``2 * B * K * C * H * itemsize``."""
    return int(cache.k.nbytes + cache.v.nbytes)


def nbytes(cache) -> int:
    """Real bytes of every array in a cache pytree (K/V storage plus per-slot metadata, scales, windows)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(cache)))


def gather_slots(cache: KVCache, idx, length=None) -> KVCache:
    """A cache whose slot j is the old slot ``idx[b, k, j]`` (``int [B, K, C']``); C' becomes the capacity.

    Indices ``< 0`` produce empty slots. ``length`` (default C') sets the new write cursor.
    """
    idx = jnp.asarray(idx, jnp.int32)
    if idx.ndim != 3 or idx.shape[:2] != cache.pos.shape[:2]:
        raise ValueError(f"idx must be int [B, K, C'] with B, K = {cache.pos.shape[:2]}, got {idx.shape}")
    empty = idx < 0
    safe = jnp.where(empty, 0, idx)
    take3 = lambda x, fill: jnp.where(empty, fill, jnp.take_along_axis(x, safe, axis=2))
    take4 = lambda x: jnp.where(empty[..., None], 0, jnp.take_along_axis(x, safe[..., None], axis=2))
    new_len = idx.shape[2] if length is None else length
    votes = cache.votes
    if votes is not None:  # [B, K, W, C]: the columns follow their slots, empty slots get no vote
        votes = jnp.where(empty[:, :, None], 0.0, jnp.take_along_axis(votes, safe[:, :, None], axis=3))
    return dataclasses.replace(cache, k=take4(cache.k), v=take4(cache.v), pos=take3(cache.pos, -1),
                               count=take3(cache.count, 0.0), score=take3(cache.score, 0.0),
                               length=jnp.asarray(new_len, jnp.int32), votes=votes)


def with_capacity(cache: KVCache, capacity: int) -> KVCache:
    """The same cache with ``capacity`` slots: grows with empty slots or truncates (keeping slots
    ``[0, C')``).

    Truncation is only safe after a compaction has moved the kept slots to the front (``policies.compress``).
    """
    capacity = check_positive_int("capacity", capacity)
    c = cache.capacity
    idx = jnp.arange(capacity, dtype=jnp.int32)
    idx = jnp.where(idx < c, idx, -1)
    idx = jnp.broadcast_to(idx, (*cache.pos.shape[:2], capacity))
    return gather_slots(cache, idx, length=jnp.minimum(cache.length, capacity))
