"""Chunked prefill with eviction between chunks: peak memory is set by the budget and the chunk, not the
prompt.

A prompt of S tokens is consumed in chunks of T tokens by ``lax.scan``; before each chunk is appended the
policy compresses the cache back to its budget (``policies.make_room``), so the cache never holds more than
``budget + T`` slots and the attention scores of a chunk are ``[T, budget + T]``, never ``[S, S]``. For a
whole model, run the same scan over the model's per-chunk forward (every layer calling ``policies.step`` on
its own cache): :func:`scan_chunks` is that driver.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from selmerge_jax.kvcache import policies
from selmerge_jax.kvcache.cache import KVCache
from selmerge_jax.kvcache.config import KVCompressionConfig

__all__ = ["chunked_prefill", "left_pad", "scan_chunks"]


def left_pad(x, positions, chunk: int):
    """Left-pads ``x [B, S, ...]`` and ``positions [B, S]`` to a multiple of ``chunk`` (padding position
    -1)."""
    s = x.shape[1]
    pad = -s % chunk
    if pad == 0:
        return x, positions
    x = jnp.pad(x, [(0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 2))
    return x, jnp.pad(positions, [(0, 0), (pad, 0)], constant_values=-1)


def scan_chunks(step_fn: Callable, state, xs, positions, chunk: int):
    """Runs ``state, out = step_fn(state, x_chunk, pos_chunk)`` over consecutive chunks of axis 1.

    ``xs`` is an array or pytree of arrays ``[B, S, ...]`` with S a multiple of ``chunk`` (see
    :func:`left_pad`); returns ``(state, outs)`` with the chunk outputs concatenated back along axis 1.
    """
    s = positions.shape[1]
    if chunk <= 0 or s % chunk:
        raise ValueError(f"prompt length S={s} must be a positive multiple of chunk={chunk} (left_pad first)")
    n = s // chunk
    split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0)
    merge = lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], s, *a.shape[3:])

    def body(carry, inp):
        x, p = inp
        return step_fn(carry, x, p)

    state, outs = jax.lax.scan(body, state, (jax.tree_util.tree_map(split, xs), split(positions)))
    return state, jax.tree_util.tree_map(merge, outs)


def chunked_prefill(cache: KVCache, config: KVCompressionConfig, q, k, v, positions, *, chunk: int,
                    budget: int, finish: bool = True, scale: float | None = None):
    """One attention layer's prefill of q ``[B, S, N, H]``, k/v ``[B, S, K, H]`` in chunks of ``chunk``
    tokens.

    Requires ``cache.capacity >= budget + chunk``. A ``chunk`` that does not divide S (or exceeds it) is fine:
    the prompt is left-padded (position -1) and the padding rows are cut from ``out``; padding never votes.
    With ``finish`` the cache is compressed to ``budget`` at the end (SnapKV's one-shot compression after the
    prompt: its observation window is the prompt's last ``obs_window`` real queries, whichever chunks they
    came in). When the capacity holds the whole (padded) prompt no compression fires before that one, and the
    kept set does not depend on ``chunk``. Returns ``(out [B, S, N, H], cache)``.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    s = q.shape[1]
    padded = s + (-s % chunk)
    if config.policy == "none" and padded > cache.capacity - config.reserved:
        raise ValueError(f"a prompt of S={s} tokens (padded to {padded}, a multiple of "
                         f"chunk={chunk}) does not "
                         f"fit a cache of capacity C={cache.capacity} with "
                         "policy='none' (nothing is evicted); "
                         "allocate a larger cache or pick a compression policy")
    if config.policy != "none":
        config.check_capacity(budget, cache.capacity, chunk)
    if padded != s:
        (q, _), (k, _), (v, positions) = (left_pad(x, positions, chunk) for x in (q, k, v))

    def step(c, x, p):
        qc, kc, vc = x
        out, c = policies.step(c, config, qc, kc, vc, p, budget=budget, scale=scale)
        return c, out

    cache, out = scan_chunks(step, cache, (q, k, v), positions, chunk)
    out = out[:, out.shape[1] - s:]
    if finish and config.policy != "none":
        cache = jax.lax.cond(cache.length > budget, lambda c: policies.compress(c, config, budget),
                             lambda c: c,
                             cache)
    return out, cache
