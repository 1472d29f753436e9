"""Chunked prefill with eviction between chunks (bounded peak memory) and query-aware block selection at
decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention.reference import dense_attention as _dense_eager
from selmerge_jax.kvcache import cache as kc
from selmerge_jax.kvcache import policies as kp
from selmerge_jax.kvcache import prefill as kpre
from selmerge_jax.kvcache import query_select as qs
from selmerge_jax.kvcache.config import KVCompressionConfig

# Jitted wrappers: one compile per shape instead of one per eager primitive (keeps the CPU suite fast).
dense_attention = jax.jit(_dense_eager, static_argnames=("causal", "return_lse"))
_attend = jax.jit(kc.attend)
_attend_selected = jax.jit(qs.attend_selected,
                           static_argnames=("block", "top_m", "sink_blocks", "local_blocks",
                                                                 "centroids", "scale"))
_select_blocks = jax.jit(qs.select_blocks, static_argnames=("block", "top_m", "sink_blocks", "local_blocks"))

B, K, G, H = 1, 2, 2, 16
N = K * G


def _data(s, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, s, N, H)), jax.random.normal(ks[1], (B, s, K, H)),
            jax.random.normal(ks[2], (B, s, K, H)))


def test_chunked_prefill_with_room_for_everything_equals_dense():
    q, k, v = _data(32)
    config = KVCompressionConfig(policy="snapkv", budget=40, slack=8, sink=2, window=4)
    cache = kp.init_for(config, B, K, 48, H, jnp.float32)
    out, cache = jax.jit(lambda c: kpre.chunked_prefill(c, config, q, k, v, jnp.arange(32)[None], chunk=8,
                                                        budget=40))(cache)
    np.testing.assert_allclose(out, dense_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert int(kc.num_valid(cache).min()) == 32


def test_chunked_prefill_evicts_between_chunks_and_keeps_sinks_and_window():
    s, chunk, budget = 64, 8, 16
    q, k, v = _data(s)
    config = KVCompressionConfig(policy="streaming", budget=budget, slack=chunk, sink=2, window=14)
    cache = kp.init_for(config, B, K, budget + chunk, H, jnp.float32)
    out, cache = jax.jit(lambda c: kpre.chunked_prefill(c, config, q, k, v, jnp.arange(s)[None], chunk=chunk,
                                                        budget=budget))(cache)
    assert cache.capacity == budget + chunk and int(cache.length) == budget
    kept = sorted(p for p in cache.pos[0, 0].tolist() if p >= 0)
    assert kept == [0, 1] + list(range(s - 14, s))
    # The last chunk saw exactly sinks + the previous 14 + its own causal prefix (streaming attention).
    t = s - 1
    seen = jnp.array([0, 1] + list(range(s - 8 - 14, s)))
    ref = dense_attention(q[:, t:], k[:, seen], v[:, seen], causal=True)
    np.testing.assert_allclose(out[:, t:], ref, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_peak_memory_does_not_grow_with_the_prompt():
    """Compiled temp memory at S=128 and S=512 is the same: the budget and chunk bound it, not the prompt."""
    config = KVCompressionConfig(policy="h2o", budget=24, slack=8, sink=1, window=4)

    def temp_bytes(s):
        q, k, v = (jax.ShapeDtypeStruct((B, s, n, H), jnp.float32) for n in (N, K, K))
        cache = jax.eval_shape(lambda: kp.init_for(config, B, K, 32, H, jnp.float32))
        f = lambda c, q, k, v: kpre.chunked_prefill(c, config, q, k, v, jnp.arange(s)[None], chunk=8,
                                                     budget=24)[1]
        return jax.jit(f).lower(cache, q, k, v).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(128), temp_bytes(512)
    assert large <= small + 4 * 512 * (N + 2 * K) * H * 4  # at most a few input-sized copies, no S x S term
    assert large < 512 * 512 * 4  # a dense [S, S] float32 score matrix would not fit in this


def test_left_pad_and_chunk_validation():
    x = jnp.ones((B, 5, 3))
    xp, pp = kpre.left_pad(x, jnp.arange(5)[None], 4)
    assert xp.shape == (B, 8, 3) and pp[0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="multiple of chunk"):
        kpre.scan_chunks(lambda s, x, p: (s, x), 0, x, jnp.arange(5)[None], 4)


def _full_cache(s, keys=None, seed=0):
    _, k, v = _data(s, seed)
    k = k if keys is None else keys
    return jax.jit(kc.append)(kc.init_cache(B, K, s, H, jnp.float32), k, v, jnp.arange(s)[None]), k, v


def test_selecting_all_blocks_equals_full_attention():
    cache, _, _ = _full_cache(32)
    q = jax.random.normal(jax.random.PRNGKey(3), (B, 1, N, H))
    at = jnp.full((B, 1), 31)
    np.testing.assert_allclose(_attend_selected(cache, q, at, block=8, top_m=4), _attend(cache, q, at),
                               rtol=1e-6, atol=1e-6)


def test_query_aware_selection_finds_the_needle_region():
    s, block = 64, 8
    keys = 0.1 * jax.random.normal(jax.random.PRNGKey(4), (B, s, K, H))
    keys = keys.at[:, 26].set(3.0 * jax.nn.one_hot(5, H))  # the needle sits in region 3
    cache, k, v = _full_cache(s, keys=keys)
    q = jnp.broadcast_to(3.0 * jax.nn.one_hot(5, H), (B, 1, N, H))
    regions = _select_blocks(cache, q, block=block, top_m=3)
    assert regions[0].tolist() == [[0, 3, 7]] * K  # sink, needle, local
    out = _attend_selected(cache, q, jnp.full((B, 1), s - 1), block=block, top_m=3)
    seen = jnp.array(list(range(8)) + list(range(24, 32)) + list(range(56, 64)))
    np.testing.assert_allclose(out, dense_attention(q, k[:, seen], v[:, seen], causal=False), rtol=1e-5,
                               atol=1e-5)


def test_block_centroids_are_exact_when_regions_have_constant_keys():
    s, block = 32, 8
    base = jax.random.normal(jax.random.PRNGKey(5), (B, s // block, K, H))
    keys = jnp.repeat(base, block, axis=1)  # every region's keys are equal: its centroid is lossless
    cache, _, _ = _full_cache(s, keys=keys)
    q = jax.random.normal(jax.random.PRNGKey(6), (B, 1, N, H))
    at = jnp.full((B, 1), s - 1)
    out = _attend_selected(cache, q, at, block=block, top_m=2, centroids=True)
    np.testing.assert_allclose(out, _attend(cache, q, at), rtol=1e-5, atol=1e-5)
    assert not np.allclose(_attend_selected(cache, q, at, block=block, top_m=2), _attend(cache, q, at))


def test_block_selection_rejects_bad_args():
    cache, _, _ = _full_cache(16)
    q = jnp.ones((B, 1, N, H))
    with pytest.raises(ValueError, match="divisor"):
        qs.attend_selected(cache, q, jnp.zeros((B, 1), jnp.int32), block=5, top_m=1)
    with pytest.raises(ValueError, match="top_m=3"):
        qs.attend_selected(cache, q, jnp.zeros((B, 1), jnp.int32), block=8, top_m=3)
    with pytest.raises(ValueError, match="exceed top_m"):
        qs.attend_selected(cache, q, jnp.zeros((B, 1), jnp.int32), block=4, top_m=1)


def test_refreshed_block_index_equals_rebuilt_index_during_decode():
    s, block = 24, 4
    _, k, v = _data(s)
    cache = kc.init_cache(B, K, s, H, jnp.float32)
    cache = jax.jit(kc.append)(cache, k[:, :9], v[:, :9], jnp.arange(9)[None])
    index = qs.build_index(cache, block)

    @jax.jit
    def decode(cache, index, k_t, v_t, p_t, q_t):
        start = cache.length
        cache = kc.append(cache, k_t, v_t, p_t)
        index = qs.refresh_index(index, cache, start, k_t.shape[1])
        return cache, index, qs.attend_selected(cache, q_t, p_t, block=block, top_m=3, index=index,
                                                centroids=True)

    q = jax.random.normal(jax.random.PRNGKey(7), (B, 1, N, H))
    for i, t in ((9, 1), (10, 3), (13, 5), (18, 6)):  # decode steps and chunks crossing region borders
        p = jnp.arange(i, i + t)[None]
        cache, index, out = decode(cache, index, k[:, i:i + t], v[:, i:i + t], p, jnp.repeat(q, t, 1))
    ref = qs.build_index(cache, block)
    for got, want in zip(qs._fields(index), qs._fields(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, _attend_selected(cache, jnp.repeat(q, 6, 1), jnp.arange(18, 24)[None],
                                                     block=block, top_m=3, centroids=True), rtol=1e-5,
                               atol=1e-5)
