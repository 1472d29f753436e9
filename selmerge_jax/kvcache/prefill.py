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

:func:`snapkv_once` is SnapKV as published: one compression after the whole prompt, its observation window
voting over every earlier key, the window's softmax taken over key chunks so that nothing of size
``obs_window * S`` per head is ever built. Two passes over the prompt's keys instead of ``S / chunk``
sequential chunks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from selmerge_jax.kvcache import policies
from selmerge_jax.kvcache.cache import KVCache, append, attend
from selmerge_jax.kvcache.config import KVCompressionConfig
from selmerge_jax.validation import check_positive_int, fail

__all__ = ["KEY_CHUNK", "chunked_prefill", "compress_prompt", "left_pad", "one_shot", "scan_chunks",
           "scored_rows", "snapkv_once"]

KEY_CHUNK = 16384  # keys per step of snapkv_once's window softmax


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


def one_shot(config: KVCompressionConfig) -> bool:
    """Whether a one-pass prefill compresses each layer's prompt at once (:func:`snapkv_once`: SnapKV as
    published, the prompt's last ``obs_window`` queries voting over every key) rather than streaming it
    ``slack`` tokens at a time (:func:`compress_prompt`): SnapKV without merging or summary slots (those read
    every evicted K/V). At 512K tokens the streaming cost more than the MS attention itself (29.0 s against a
    13.6 s full-cache prefill, ``experiments/results/inference_h200``)."""
    return config.policy == "snapkv" and config.merge == "none" and not config.summary_slots


def snapkv_once(cache: KVCache, config: KVCompressionConfig, q, k, v, positions, *, budget: int,
                scale: float | None = None, window: int | None = None, key_chunk: int = KEY_CHUNK) -> KVCache:
    """SnapKV's one-shot compression of one layer's whole prompt into ``cache``, without streaming it.

    q ``[B, S, N, H]``, k/v ``[B, S, K, H]``, positions ``int [B, S]`` (right-padded rows, padding -1);
    ``cache``: an empty cache from ``policies.init_for(config, ...)`` with ``capacity >= budget`` (the kept
    slots are written into its first slots; the others must be empty, as ``init_for`` leaves them);
    ``window``: the model's sliding window, as in ``attend``. The last
    ``obs_window`` real queries of each row vote over all keys, their softmax taken ``key_chunk`` keys at a
    time (static; a running max and sum, then the normalized votes), so only ``[B, K, S]`` arrays and the kept
    slots grow with S, never ``[B, K, G, obs_window, S]`` probabilities.

    The result is the cache :func:`chunked_prefill` (or, with ``window``, :func:`compress_prompt`) leaves
    when the whole prompt is one chunk and it is then compressed to ``budget``, on the first
    ``cache.capacity`` slots: the same slots (kept tokens in position order, then the free ones), K/V, pos,
    count, score, ``length`` and ``dropped``. The ``votes`` rows are equal up to float rounding only: the
    softmax sum is accumulated chunk by chunk, not in one reduction, so the kept set could differ only where
    two pooled votes tie to the last bit. A budget larger than a row's real tokens evicts nothing from that
    row (it keeps some padding slots, as ``compress`` does); with ``budget >= S`` nothing fires and the result
    is the appended prompt with its votes (``length`` S). Merging and summary slots are not supported: they
    need every evicted K/V.
    """
    check_positive_int("key_chunk", key_chunk)
    check_positive_int("window", window, allow_none=True)
    if config.policy != "snapkv":
        fail("KVCompressionConfig.policy", config.policy,
             "'snapkv' for snapkv_once (other policies stream the prompt: compress_prompt)")
    if config.merge != "none":
        fail("KVCompressionConfig.merge", config.merge, "'none' for snapkv_once (merging reads every evicted "
             "K/V: compress_prompt)")
    if config.summary_slots:
        fail("KVCompressionConfig.summary_slots", config.summary_slots, "0 for snapkv_once (summaries read "
             "every evicted K/V: compress_prompt)")
    if cache.votes is None:
        fail("cache.votes", None, "SnapKV's window rows: build the cache with policies.init_for(config, ...)")
    config.check_capacity(budget, cache.capacity)
    _check_prompt(cache, q, k, v, positions)
    positions = jnp.asarray(positions, jnp.int32)
    b, s, n, h = q.shape
    kh = k.shape[2]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qw, pw = _last_rows(q, positions, config.obs_window)  # the window: [B, W, N, H], [B, W] (-1: none)
    qw = qw.reshape(b, -1, kh, n // kh, h)
    # Scored as the cache would hold them (rounded to its dtype), one chunk at a time: no converted copy of k.
    logits = lambda keys, kpos: _window_logits(qw, pw, keys.astype(cache.k.dtype), kpos, scale, window)
    t = min(key_chunk, s)
    m, denom = _softmax_stats(logits, k, positions, t, (b, kh, n // kh, qw.shape[1]))
    keep = min(budget, s)  # chunked_prefill compresses only when the prompt exceeds the budget
    if s > budget:
        vote = _window_votes(logits, k, positions, t, m, denom)
        idx = _top_slots(vote, positions, pw, config, keep)
    else:
        idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, kh, s))
    pos = jnp.take_along_axis(positions[:, None, :], idx, axis=2)
    out = policies._write(cache, 0, k=_gather_tokens(k, idx), v=_gather_tokens(v, idx), pos=pos,
                          count=(pos >= 0).astype(jnp.float32), score=jnp.zeros(pos.shape, jnp.float32))
    out = dataclasses.replace(out, length=jnp.asarray(keep, jnp.int32))
    # The window's rows over the kept slots, normalized over the whole prompt: what observe recorded.
    probs = _normalize(logits(out.k.swapaxes(1, 2), out.pos), m, denom)
    return policies.observe(out, probs, config, pw)


def _check_prompt(cache: KVCache, q, k, v, positions) -> None:
    b, kh, _, h = cache.k.shape
    if getattr(k, "ndim", None) != 4 or k.shape[0] != b or k.shape[2:] != (kh, h):
        fail("k", jnp.shape(k), f"[B={b}, S, K={kh}, H={h}] (the cache's batch, kv heads and head dim)")
    if jnp.shape(v) != k.shape:
        fail("v", jnp.shape(v), f"k's shape {k.shape}")
    s = k.shape[1]
    if getattr(q, "ndim", None) != 4 or q.shape[:2] != (b, s) or q.shape[3] != h or q.shape[2] % kh:
        fail("q", jnp.shape(q), f"[B={b}, S={s}, N, H={h}] with N a multiple of K={kh}")
    if jnp.shape(positions) != (b, s) or not jnp.issubdtype(jnp.asarray(positions).dtype, jnp.integer):
        fail("positions", jnp.shape(positions), f"int [B={b}, S={s}]")


def _window_logits(qw, qpos, keys, kpos, scale: float, window: int | None):
    """``float32 [B, K, G, W, T]`` logits of the window queries ``qw [B, W, K, G, H]`` at ``qpos [B, W]`` over
    ``keys [B, T, K, H]`` at ``kpos [B, 1 or K, T]``, -inf where ``attend_slots`` masks (padding, the future,
    outside the sliding ``window``). Real tokens have count 1, so attend's ``log(count)`` term is 0."""
    logits = jnp.einsum("bwkgh,btkh->bkgwt", qw, keys.astype(qw.dtype), preferred_element_type=jnp.float32)
    qp, kp = qpos[:, None, :, None], kpos[:, :, None, :]  # [B, 1, W, 1], [B, K|1, 1, T]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask = mask & (kp > qp - window)
    return jnp.where(mask[:, :, None], logits * scale, -jnp.inf)


def _key_chunk(k, positions, i, t: int):
    """Keys ``[B, t, K, H]`` and positions ``[B, 1, t]`` of chunk ``i``, and its start: the last chunk is
    moved back to end at S (no padded copy of k), so it may overlap the previous one."""
    start = jnp.minimum(i * t, k.shape[1] - t)
    keys = jax.lax.dynamic_slice_in_dim(k, start, t, axis=1)
    return keys, jax.lax.dynamic_slice_in_dim(positions, start, t, axis=1)[:, None], start


def _softmax_stats(logits_fn, k, positions, t: int, shape: tuple[int, ...]):
    """The window queries' softmax max and sum ``shape = [B, K, G, W]`` over all keys, one key chunk at a time
    (online: the sum is rescaled whenever the max grows). A query that sees nothing gets max 0, sum 1."""
    def body(i, carry):
        m, denom = carry
        keys, kpos, start = _key_chunk(k, positions, i, t)
        logits = logits_fn(keys, kpos)
        fresh = start + jnp.arange(t) >= i * t  # keys of an overlapping last chunk are already summed
        new = jnp.maximum(m, logits.max(-1))
        safe = jnp.where(jnp.isfinite(new), new, 0.0)  # nothing seen yet: avoid inf - inf
        p = jnp.where(fresh, jnp.exp(logits - safe[..., None]), 0.0)
        return new, denom * jnp.exp(m - safe) + p.sum(-1)

    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32))
    m, denom = jax.lax.fori_loop(0, -(-k.shape[1] // t), body, init)
    return jnp.where(jnp.isfinite(m), m, 0.0), jnp.where(denom == 0, 1.0, denom)


def _normalize(logits, m, denom):
    """Probabilities ``[B, K, G, W, T]`` from masked logits and the whole prompt's softmax statistics."""
    return jnp.exp(logits - m[..., None]) / denom[..., None]


def _window_votes(logits_fn, k, positions, t: int, m, denom):
    """``float32 [B, K, S]``: each key's probability summed over the window queries, averaged over the G
    query heads of its kv head (``observe``'s rows, summed as ``_snapkv_scores`` sums them)."""
    def body(i, vote):
        keys, kpos, start = _key_chunk(k, positions, i, t)
        probs = _normalize(logits_fn(keys, kpos), m, denom)
        return jax.lax.dynamic_update_slice_in_dim(vote, probs.mean(2).sum(2), start, axis=2)

    b, s, kh, _ = k.shape
    return jax.lax.fori_loop(0, -(-s // t), body, jnp.zeros((b, kh, s), jnp.float32))


def _top_slots(vote, positions, window_pos, config: KVCompressionConfig, keep: int):
    """Prompt indices ``int32 [B, K, keep]`` (ascending) that ``compress`` keeps, ranked by ``slot_scores``
    on a virtual cache of the prompt's S slots: positions and the mean vote, no K/V (``H = 0``)."""
    b, kh, s = vote.shape
    written = (window_pos >= 0).sum(1)[:, None, None]  # window queries per row, as _snapkv_scores counts
    none = jnp.zeros((b, kh, s, 0), jnp.float32)
    pos = jnp.broadcast_to(positions[:, None, :], vote.shape)
    virtual = KVCache(k=none, v=none, pos=pos, count=(pos >= 0).astype(jnp.float32),
                      score=vote / jnp.maximum(written, 1), length=jnp.asarray(s, jnp.int32),
                      dropped=jnp.zeros((), jnp.int32))  # votes=None: slot_scores pools `score`
    # top_k, not policies._keep_best: a cache holding the whole prompt has C >= budget + S > 2 * keep slots,
    # so compress always takes _keep_best's top_k branch, and equal scores (e.g. keys outside a sliding
    # window, all 0) must break the same way: the lower slot wins.
    _, top = jax.lax.top_k(policies.slot_scores(virtual, config), keep)
    return jnp.sort(top, axis=-1).astype(jnp.int32)


def _gather_tokens(x, idx):
    """``x [B, S, K, H]`` at per-kv-head prompt indices ``idx [B, K, n]`` -> ``[B, K, n, H]``."""
    return jnp.take_along_axis(x, idx.swapaxes(1, 2)[..., None], axis=1).swapaxes(1, 2)
