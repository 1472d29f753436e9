"""What evicted tokens become: merged into kept slots, into region centroids, or into summary memory slots.

All functions are pure and work on slot arrays ``[B, K, C, ...]`` with boolean masks instead of ragged sets,
so the shapes never depend on how many tokens are evicted. A merged slot stores the count-weighted mean of its
members' K/V and the sum of their counts; ``attend`` adds ``log(count)`` to its logit so the softmax mass
stays proportional to the number of tokens it stands for. Its position is the largest member position, so a
merged slot is only visible to queries that could see all of its members (causality is never broken by a
merge).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["bucket_means", "centroids", "merge_into_kept", "position_buckets", "update_summary"]


def _unit(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def merge_into_kept(k, v, count, kept_idx, evicted, *, value_only: bool):
    """Merges every evicted slot into the kept slot whose key is most cosine-similar.

    Args:
      k, v: ``[B, K, C, H]``; count: ``float32 [B, K, C]``; kept_idx: ``int [B, K, J]`` (J kept slots);
      evicted: ``bool [B, K, C]``, the valid slots that are being dropped.
      value_only: mix only values (weights ``count * max(cos, 0)``; keys, counts and positions of the kept
        slots untouched, so RoPE'd keys stay exact: kvpress MergingPress). Otherwise keys and values are
        count-weighted means and counts add up (ToMe / KVCache-Factory style).

    Returns:
      ``(k_kept, v_kept, count_kept)`` with shapes ``[B, K, J, H]``, ``[B, K, J, H]``, ``[B, K, J]``.
    """
    take = lambda x: jnp.take_along_axis(x, kept_idx[..., None], axis=2)
    kk, vk = take(k).astype(jnp.float32), take(v).astype(jnp.float32)
    ck = jnp.take_along_axis(count, kept_idx, axis=2)
    sim = jnp.einsum("bkch,bkjh->bkcj", _unit(k), _unit(kk))  # [B, K, C, J]
    target = jnp.argmax(sim, -1)
    w = jnp.where(evicted, count, 0.0)
    if value_only:
        w = w * jnp.maximum(jnp.take_along_axis(sim, target[..., None], -1)[..., 0], 0.0)
    onehot = jax.nn.one_hot(target, kept_idx.shape[-1], dtype=jnp.float32) * w[..., None]  # [B, K, C, J]
    add_w = onehot.sum(2)  # [B, K, J]
    denom = jnp.maximum(ck + add_w, 1e-30)
    v_new = (ck[..., None] * vk + jnp.einsum("bkcj,bkch->bkjh", onehot, v.astype(jnp.float32))) / denom[...,
                                                                                                        None]
    if value_only:
        return kk.astype(k.dtype), v_new.astype(v.dtype), ck
    k_new = (ck[..., None] * kk + jnp.einsum("bkcj,bkch->bkjh", onehot, k.astype(jnp.float32))) / denom[...,
                                                                                                        None]
    return k_new.astype(k.dtype), v_new.astype(v.dtype), ck + add_w


def position_buckets(pos, count, member, n: int):
    """``int32 [B, K, C]``: bucket in ``[0, n)`` of each member slot, contiguous in position, equal in mass.

    Members are sorted by position; a slot goes to bucket ``floor(n * (mass before it + count/2) / total)``,
    so the n buckets split the members' total count into contiguous position ranges of about equal mass.
    Non-members get bucket 0 (callers mask them).
    """
    big = jnp.iinfo(jnp.int32).max
    order = jnp.argsort(jnp.where(member, pos, big), axis=-1, stable=True)
    c_sorted = jnp.take_along_axis(jnp.where(member, count, 0.0), order, -1)
    cum = jnp.cumsum(c_sorted, -1) - 0.5 * c_sorted
    total = jnp.maximum(c_sorted.sum(-1, keepdims=True), 1e-30)
    b_sorted = jnp.clip(jnp.floor(n * cum / total), 0, n - 1).astype(jnp.int32)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(b_sorted, inverse, -1)


def bucket_means(k, v, pos, count, member, bucket, n: int):
    """Count-weighted mean K/V, summed count and max position of the members of each of n buckets.

    Returns ``k [B, K, n, H]`` float32, ``v`` likewise, ``count float32 [B, K, n]``, ``pos int32 [B, K, n]``
    (``-1`` for empty buckets).
    """
    onehot = jax.nn.one_hot(bucket, n, dtype=jnp.float32) * jnp.where(member, count, 0.0)[..., None]
    c = onehot.sum(2)
    denom = jnp.maximum(c, 1e-30)[..., None]
    km = jnp.einsum("bkcn,bkch->bknh", onehot, k.astype(jnp.float32)) / denom
    vm = jnp.einsum("bkcn,bkch->bknh", onehot, v.astype(jnp.float32)) / denom
    in_bucket = (onehot > 0) & member[..., None]
    p = jnp.max(jnp.where(in_bucket, pos[..., None], -1), axis=2)
    return km, vm, c, jnp.where(c > 0, p, -1)


def centroids(k, v, pos, count, member, n: int):
    """n region centroids of the member slots: contiguous position ranges of about equal token mass."""
    bucket = position_buckets(pos, count, member, n)
    return bucket_means(k, v, pos, count, member, bucket, n)


def update_summary(summary, new, *, mode: str, decay: float):
    """Folds per-bucket means of newly evicted tokens into summary slots.

    Args:
      summary, new: ``(k [B, K, n, H], v, count [B, K, n], pos [B, K, n])``; ``new`` from
      :func:`bucket_means`. mode: ``"cumulative"`` keeps the exact running mean of everything ever folded in;
      ``"ema"`` moves the
        slot towards the new mean by ``1 - decay`` (recent evictions weigh more). Counts add up in both modes,
        because the slot still stands for all the tokens folded into it.
    """
    sk, sv, sc, sp = summary
    nk, nv, nc, np_ = new
    has_new = (nc > 0)[..., None]
    if mode == "cumulative":
        denom = jnp.maximum(sc + nc, 1e-30)[..., None]
        mix = lambda old, upd: (sc[..., None] * old.astype(jnp.float32) + nc[..., None] * upd) / denom
    else:
        fresh = (sc == 0)[..., None]
        mix = lambda old, upd: jnp.where(fresh, upd, decay * old.astype(jnp.float32) + (1 - decay) * upd)
    k_out = jnp.where(has_new, mix(sk, nk), sk.astype(jnp.float32)).astype(sk.dtype)
    v_out = jnp.where(has_new, mix(sv, nv), sv.astype(jnp.float32)).astype(sv.dtype)
    return k_out, v_out, sc + nc, jnp.maximum(sp, np_)
