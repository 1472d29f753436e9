"""Chunked prefill with eviction between chunks: peak memory is set by the budget and the chunk, not the
prompt.

A prompt of S tokens is consumed in chunks of T tokens by ``lax.scan``; before each chunk is appended the
policy compresses the cache back to its budget (``policies.make_room``), so the cache never holds more than
``budget + T`` slots and the attention scores of a chunk are ``[T, budget + T]``, never ``[S, S]``. For a
whole model, run the same scan over the model's per-chunk forward (every layer calling ``policies.step`` on
its own cache): :func:`scan_chunks` is that driver.

:func:`compress_prompt` is the same eviction schedule for a prefill whose attention output comes from
elsewhere (a one-pass select-and-merge forward over the whole prompt, ``models.generate``): the layer's prompt
k/v stream into a cache of ``budget + chunk`` slots chunk by chunk, and only the queries a policy reads are
scored against the cache (SnapKV its observation window, TOVA the latest query, H2O every query,
StreamingLLM none). The kept set is the one :func:`chunked_prefill` keeps from the same q/k/v.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from selmerge_jax.kvcache import policies
from selmerge_jax.kvcache.cache import KVCache, append, attend
from selmerge_jax.kvcache.config import KVCompressionConfig
from selmerge_jax.validation import check_positive_int, fail

__all__ = ["chunked_prefill", "compress_prompt", "left_pad", "scan_chunks", "scored_rows"]


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


def scored_rows(config: KVCompressionConfig, chunk: int) -> int:
    """How many of a chunk's queries the policy reads: the last ``obs_window`` (SnapKV), the latest (TOVA),
    all (H2O), none (StreamingLLM and ``"none"``)."""
    if not policies.needs_probs(config):
        return 0
    return {"snapkv": min(config.obs_window, chunk), "tova": 1}.get(config.policy, chunk)


def _last_rows(x, positions, n: int):
    """The last ``n`` rows of each batch row's real (position >= 0) run: ``x [B, T, ...]`` gathered to
    ``[B, n, ...]`` and their positions ``[B, n]`` (-1 where the run is shorter than ``n``).

    Real tokens of a chunk are one contiguous run (prompts are padded at one end only), so these are the rows
    ``policies.observe`` would pick out of the whole chunk.
    """
    t = positions.shape[1]
    real = positions >= 0
    last = t - 1 - jnp.argmax(real[:, ::-1], axis=1)  # [B]; a chunk of padding only: its last row (padding)
    idx = last[:, None] - (n - 1) + jnp.arange(n)  # [B, n]
    ok = idx >= 0
    idx = jnp.clip(idx, 0, t - 1)
    pos = jnp.where(ok, jnp.take_along_axis(positions, idx, axis=1), -1)
    gather = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return gather, pos


def compress_prompt(cache: KVCache, config: KVCompressionConfig, q, k, v, positions, *, chunk: int,
                    budget: int, finish: bool = True, scale: float | None = None, window: int | None = None):
    """Streams one layer's prompt k/v ``[B, S, K, H]`` into a compressed cache, ``chunk`` tokens at a time.

    For each chunk: compress to ``budget`` if the chunk would not fit (``policies.make_room``), append it, and
    fold into the policy's score the attention over the cache of the chunk's queries the policy reads
    (:func:`scored_rows`; q ``[B, S, N, H]``). The attention *output* is not computed: the caller has it from
    its own forward. The cache therefore never holds more than ``budget + chunk`` slots whatever S is, and the
    kept set equals :func:`chunked_prefill`'s on the same q/k/v (same chunks, same left padding, same final
    compression with ``finish``). Returns the cache.
    """
    check_positive_int("chunk", chunk)
    if config.policy == "none":
        fail("KVCompressionConfig.policy", config.policy,
             "a compression policy for compress_prompt (a full cache needs no streaming: kvcache.append)")
    config.check_capacity(budget, cache.capacity, chunk)
    s = k.shape[1]
    if s % chunk:
        (q, _), (k, _), (v, positions) = (left_pad(x, positions, chunk) for x in (q, k, v))
    rows = scored_rows(config, chunk)

    def step(c, x, p):
        qc, kc, vc = x
        c = policies.make_room(c, config, budget, chunk)
        c = append(c, kc, vc, p)
        if rows:
            qs, ps = (qc, p) if rows == chunk else _last_rows(qc, p, rows)
            _, probs, _ = attend(c, qs, ps, scale=scale, return_probs=True, window=window)
            c = policies.observe(c, probs, config, ps)
        return c, None

    cache, _ = scan_chunks(step, cache, (q, k, v), positions, chunk)
    if finish:
        cache = jax.lax.cond(cache.length > budget, lambda c: policies.compress(c, config, budget),
                             lambda c: c, cache)
    return cache
