"""int8/int4 KV storage in the KIVI layout, composable with every eviction policy.

- Keys are quantized per channel: one (scale, zero) per kv head and channel for each group of ``quant_group``
  consecutive slots (key outliers live in a few channels, so a per-token scale would waste the range).
- Values are quantized per token: one (scale, zero) per slot (values have no channel outliers; per-token keeps
  each token's error independent of its neighbours).
- The latest tokens stay in full precision in a small ``recent`` :class:`KVCache`; they are quantized a group
  at a time when the window overflows, so a group's key scales see all of its tokens at once.
- Eviction runs on the dequantized store and re-quantizes (kvpress does the same): ``compress`` is the same
  function as for a float cache, so any policy/merge composes with quantization.

int4 codes are packed two per byte along H, so the reported byte size is the real one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from selmerge_jax.kvcache import policies
from selmerge_jax.kvcache.cache import KVCache, append, attend_segments, gather_slots, init_cache
from selmerge_jax.kvcache.config import KVCompressionConfig

__all__ = ["QuantizedKVCache", "as_float_cache", "dequantize", "init_quantized", "quantize", "quantized_step"]

_BITS = {"int8": 8, "int4": 4}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
    """Quantized main store ``[B, K, Cq, ...]`` plus a full-precision recent window (a :class:`KVCache`)."""

    kq: jax.Array  # uint8 [B, K, Cq, H] (int8) or [B, K, Cq, H/2] (int4, packed)
    k_scale: jax.Array  # float32 [B, K, Cq/g, H]
    k_zero: jax.Array  # float32 [B, K, Cq/g, H]
    vq: jax.Array  # uint8, like kq
    v_scale: jax.Array  # float32 [B, K, Cq]
    v_zero: jax.Array  # float32 [B, K, Cq]
    pos: jax.Array  # int32 [B, K, Cq]
    count: jax.Array  # float32 [B, K, Cq]
    score: jax.Array  # float32 [B, K, Cq]
    length: jax.Array  # int32 []
    recent: KVCache
    bits: int = dataclasses.field(metadata={"static": True}, default=8)
    group: int = dataclasses.field(metadata={"static": True}, default=32)


def _pack(codes, bits: int):
    if bits == 8:
        return codes.astype(jnp.uint8)
    c = codes.astype(jnp.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def _unpack(packed, bits: int):
    if bits == 8:
        return packed
    lo, hi = packed & 0xF, packed >> 4
    return jnp.stack([lo, hi], -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize(x, bits: int, axis: int):
    """Asymmetric min/max quantization of float ``x`` reducing over ``axis``:
    ``(codes uint8, scale, zero)``."""
    x = x.astype(jnp.float32)
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    scale = jnp.maximum(hi - lo, 1e-8) / (2**bits - 1)
    codes = jnp.clip(jnp.round((x - lo) / scale), 0, 2**bits - 1)
    return codes.astype(jnp.uint8), scale, lo


def dequantize(codes, scale, zero, dtype):
    return (codes.astype(jnp.float32) * scale + zero).astype(dtype)


def _quant_keys(k, bits: int, group: int):
    b, kh, c, h = k.shape
    codes, scale, zero = quantize(k.reshape(b, kh, c // group, group, h), bits, axis=3)
    return _pack(codes.reshape(b, kh, c, h), bits), scale[:, :, :, 0], zero[:, :, :, 0]


def _quant_values(v, bits: int):
    codes, scale, zero = quantize(v, bits, axis=3)
    return _pack(codes, bits), scale[..., 0], zero[..., 0]


def _dequant_main(qc: QuantizedKVCache, dtype):
    b, kh, c = qc.pos.shape
    kc = _unpack(qc.kq, qc.bits).reshape(b, kh, c // qc.group, qc.group, -1)
    k = dequantize(kc, qc.k_scale[:, :, :, None], qc.k_zero[:, :, :, None], dtype).reshape(b, kh, c, -1)
    v = dequantize(_unpack(qc.vq, qc.bits), qc.v_scale[..., None], qc.v_zero[..., None], dtype)
    return k, v


def as_float_cache(qc: QuantizedKVCache) -> KVCache:
    """The main store dequantized into a float :class:`KVCache` (what policies score and compress)."""
    k, v = _dequant_main(qc, qc.recent.k.dtype)
    return KVCache(k=k, v=v, pos=qc.pos, count=qc.count, score=qc.score, length=qc.length,
                   dropped=qc.recent.dropped)


def _from_float(qc: QuantizedKVCache, fc: KVCache) -> QuantizedKVCache:
    kq, ks, kz = _quant_keys(fc.k, qc.bits, qc.group)
    vq, vs, vz = _quant_values(fc.v, qc.bits)
    return dataclasses.replace(qc, kq=kq, k_scale=ks, k_zero=kz, vq=vq, v_scale=vs, v_zero=vz, pos=fc.pos,
                               count=fc.count, score=fc.score, length=fc.length)


def init_quantized(config: KVCompressionConfig, batch: int, kv_heads: int, capacity: int, head_dim: int,
                   dtype=jnp.bfloat16, *, chunk: int = 1) -> QuantizedKVCache:
    """Empty cache: ``capacity`` quantized slots (a multiple of ``quant_group``) plus a float window of
    ``quant_window + flush`` slots, where ``flush`` (tokens quantized at once) is ``chunk`` rounded up to
    whole groups; ``chunk`` is the largest T a single call will append."""
    if config.quant == "none":
        raise ValueError("init_quantized needs KVCompressionConfig.quant in ('int8', 'int4'), got 'none'")
    g = config.quant_group
    if capacity % g or capacity <= config.reserved:
        raise ValueError(f"capacity={capacity} must be a multiple of quant_group={g} and exceed the reserved "
                         f"slots ({config.reserved})")
    bits = _BITS[config.quant]
    if bits == 4 and head_dim % 2:
        raise ValueError(f"int4 packs two channels per byte: head_dim={head_dim} must be even")
    flush = -(-max(chunk, 1) // g) * g
    fc = policies.init_for(config, batch, kv_heads, capacity, head_dim, dtype)
    qc = QuantizedKVCache(kq=None, k_scale=None, k_zero=None, vq=None, v_scale=None, v_zero=None, pos=None,
                          count=None, score=None, length=None,
                          recent=init_cache(batch, kv_heads, config.quant_window + flush, head_dim, dtype),
                          bits=bits, group=g)
    return _from_float(qc, fc)


def _flush_size(qc: QuantizedKVCache, config: KVCompressionConfig) -> int:
    return qc.recent.capacity - config.quant_window


def _flush(qc: QuantizedKVCache, config: KVCompressionConfig, budget: int) -> QuantizedKVCache:
    """Moves the oldest ``flush`` window slots into the quantized store (compressing it first if full)."""
    f = _flush_size(qc, config)
    fc = as_float_cache(qc)
    if config.policy != "none":
        fc = jax.lax.cond(fc.length + f > fc.capacity, lambda c: policies.compress(c, config, budget),
                          lambda c: c, fc)
    old = gather_slots(qc.recent, jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), (*qc.pos.shape[:2], f)))
    slots = fc.length + jnp.arange(f, dtype=jnp.int32)
    # mode="drop": with policy "none" a full store drops the flushed tokens (counted) instead of overwriting
    put = lambda dst, src: dst.at[:, :, slots].set(src.astype(dst.dtype), mode="drop")
    fc = dataclasses.replace(fc, k=put(fc.k, old.k), v=put(fc.v, old.v), pos=put(fc.pos, old.pos),
                             count=put(fc.count, old.count), score=put(fc.score, old.score),
                             length=jnp.minimum(fc.length + f, fc.capacity))
    c = qc.recent.capacity
    shift = jnp.arange(c, dtype=jnp.int32) + f
    shift = jnp.broadcast_to(jnp.where(shift < c, shift, -1), (*qc.pos.shape[:2], c))
    # A window holding fewer than f tokens (decode steps, then a chunk) flushes empty slots too; the cursor
    # must not go negative, or the next append writes at wrapped slots past it that later appends overwrite.
    recent = gather_slots(qc.recent, shift, length=jnp.maximum(qc.recent.length - f, 0))
    # Tokens lost: flushed slots past the store's end that held a written token (the window may hold fewer
    # than f tokens; its empty slots were never appended and are not lost).
    lost = jnp.sum((slots >= fc.capacity) & (jnp.arange(f) < qc.recent.length), dtype=jnp.int32)
    recent = dataclasses.replace(recent, dropped=recent.dropped + lost)
    return dataclasses.replace(_from_float(qc, fc), recent=recent)


def quantized_step(qc: QuantizedKVCache, config: KVCompressionConfig, q, k, v, positions, *, budget: int,
                   scale: float | None = None):
    """The quantized counterpart of ``policies.step``: returns ``(out [B, T, N, H], cache)``.

    ``budget`` bounds the quantized store (the float window adds ``quant_window`` more tokens).
    """
    t = q.shape[1]
    f = _flush_size(qc, config)
    if t > f:
        raise ValueError(f"T={t} tokens exceed the flush size {f}; build the cache with "
                         f"init_quantized(chunk>={t})")
    if config.policy != "none" and (budget % qc.group or budget + f > qc.pos.shape[2]):
        raise ValueError(f"budget={budget} must be a multiple of quant_group={qc.group} and leave room for "
                         f"{f} flushed slots in the quantized capacity {qc.pos.shape[2]}")
    if config.policy != "none":
        config.check_capacity(budget, qc.pos.shape[2], f)
    full = qc.recent.length + t > qc.recent.capacity
    qc = jax.lax.cond(full, lambda c: _flush(c, config, budget), lambda c: c, qc)
    recent = append(qc.recent, k, v, positions)
    km, vm = _dequant_main(qc, q.dtype)
    # Two segments, one softmax: concatenating the dequantized store with the window would copy all of K and
    # V.
    res = attend_segments(q, positions,
                          [(km, vm, qc.pos, qc.count), (recent.k, recent.v, recent.pos, recent.count)],
                          scale=scale, return_probs=policies.needs_probs(config))
    if not policies.needs_probs(config):
        return res, dataclasses.replace(qc, recent=recent)
    out, probs, _ = res
    cq = qc.pos.shape[2]
    main_view = KVCache(k=km, v=vm, pos=qc.pos, count=qc.count, score=qc.score, length=qc.length,
                        dropped=recent.dropped)
    # Neither store carries SnapKV's window rows (KVCache.votes): SnapKV here votes per call (exact when the
    # prompt is one call), and kvpress-H2O normalises by the newest position of the quantized store.
    main = policies.observe(main_view, probs[..., :cq], config, positions)
    recent = policies.observe(recent, probs[..., cq:], config, positions)
    return out, dataclasses.replace(qc, score=main.score, recent=recent)
