"""Eviction policies on hand-built attention patterns, merges, summaries, config errors, single
compilation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention.reference import dense_attention as _dense_eager
from selmerge_jax.kvcache import cache as kc
from selmerge_jax.kvcache import policies as kp
from selmerge_jax.kvcache.config import KVCompressionConfig

# Jitted wrappers: one compile per shape instead of one per eager primitive (keeps the CPU suite fast).
dense_attention = jax.jit(_dense_eager, static_argnames=("causal", "return_lse"))
_compress = jax.jit(kp.compress, static_argnums=(1, 2))
_observe = jax.jit(kp.observe, static_argnums=(2,))
_attend = jax.jit(kc.attend, static_argnames=("return_probs",))
_append = jax.jit(kc.append)

B, K, G, H = 1, 2, 2, 16
N = K * G


def _filled(n, capacity, seed=1, config=None, keys=None, values=None):
    kk, kv = jax.random.split(jax.random.PRNGKey(seed))
    k = jax.random.normal(kk, (B, n, K, H)) if keys is None else keys
    v = jax.random.normal(kv, (B, n, K, H)) if values is None else values
    cache = (kp.init_for(config, B, K, capacity, H, jnp.float32) if config is not None
             else kc.init_cache(B, K, capacity, H, jnp.float32))
    return _append(cache, k, v, jnp.arange(n)[None]), k, v


def _kept_positions(cache):
    return [sorted(p for p in cache.pos[0, h].tolist() if p >= 0) for h in range(K)]


def _onehot_keys(n, hot):
    """Key i is e_(i mod H); a query along e_hot attends (almost) only to the keys equal to e_hot."""
    return jnp.broadcast_to(jax.nn.one_hot(jnp.arange(n) % H, H)[None, :, None] * 1.0, (B, n, K, H)) + 0 * hot


# Every policy and every merge/summary mode at least once (combined, to keep the CPU suite short).
ALL = [{"policy": "streaming"}, {"policy": "h2o", "merge": "nearest"}, {"policy": "h2o", "merge": "value"},
       {"policy": "tova", "merge": "centroid", "merge_slots": 2}, {"policy": "snapkv", "summary_slots": 2}]


@pytest.mark.parametrize("kw", ALL, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_budget_that_keeps_everything_is_exact(kw):
    config = KVCompressionConfig(budget=14, sink=1, window=2, obs_window=2, pool_kernel=3, **kw)
    cache, k, v = _filled(10, 16, config=config)
    q = jax.random.normal(jax.random.PRNGKey(2), (B, 10, N, H))
    pos = jnp.arange(10)[None]
    _, probs, _ = _attend(cache, q, pos, return_probs=True)
    squeezed = _compress(_observe(cache, probs, config, pos), config, 14)
    ref = dense_attention(q, k, v)
    np.testing.assert_allclose(_attend(squeezed, q, pos), ref, rtol=1e-6, atol=1e-6)
    assert int(squeezed.length) == 14 and squeezed.capacity == 16


def test_streaming_keeps_sinks_and_recent_window():
    config = KVCompressionConfig(policy="streaming", budget=8, sink=2, window=6)
    cache, _, _ = _filled(20, 20)
    out = _compress(cache, config, 8)
    assert _kept_positions(out) == [[0, 1, 14, 15, 16, 17, 18, 19]] * K


def _decode(config, k, v, q, budget, capacity):
    cache = kp.init_for(config, B, K, capacity, H, jnp.float32)
    step = jax.jit(lambda c, q_, k_, v_, p: kp.step(c, config, q_, k_, v_, p, budget=budget))
    for i in range(k.shape[1]):
        _, cache = step(cache, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], jnp.full((B, 1), i))
    return cache


def test_h2o_keeps_heavy_hitter_and_evicts_unattended():
    n = 16
    keys = _onehot_keys(n, 0)
    q = 8.0 * jnp.broadcast_to(jax.nn.one_hot(5, H), (B, n, N, H))  # every query looks at key 5
    config = KVCompressionConfig(policy="h2o", budget=6, slack=2, sink=0, window=3)
    cache = _decode(config, keys, keys, q, 6, 8)
    kept = _kept_positions(cache)
    assert all(5 in h for h in kept)  # the heavy hitter outlives its recent window by 10 steps
    assert all(p in h for h in kept for p in (13, 14, 15))  # recent window


def test_snapkv_keeps_what_the_observation_window_attends_and_its_neighbours():
    n = 24
    keys = _onehot_keys(n, 0)
    q = jnp.zeros((B, n, N, H)).at[:, -4:].set(8.0 * jax.nn.one_hot(7, H))  # window looks at keys 7 (and 23)
    config = KVCompressionConfig(policy="snapkv", budget=7, sink=0, window=4, obs_window=4, pool_kernel=3,
                                 pool="max")
    cache, _, _ = _filled(n, n, keys=keys, values=keys)
    _, probs, _ = _attend(cache, q, jnp.arange(n)[None], return_probs=True)
    out = _compress(_observe(cache, probs, config), config, 7)
    assert _kept_positions(out) == [[6, 7, 8, 20, 21, 22, 23]] * K  # key 7 + pooled neighbours + window


def test_tova_keeps_what_the_latest_query_attends():
    n = 12
    keys = _onehot_keys(n, 0)
    q = jnp.zeros((B, n + 2, N, H)).at[:, -3].set(8.0 * jax.nn.one_hot(3, H))  # + 2 trailing padding queries
    config = KVCompressionConfig(policy="tova", budget=3, sink=0, window=1)
    cache, _, _ = _filled(n, n, keys=keys, values=keys)
    q_pos = jnp.concatenate([jnp.arange(n), jnp.array([-1, -1])])[None]
    _, probs, _ = _attend(cache, q, q_pos, return_probs=True)
    out = _compress(_observe(cache, probs, config), config, 3)
    kept = _kept_positions(out)
    assert all(3 in h and 11 in h for h in kept)


@pytest.mark.parametrize("seed", range(2))
def test_top_scores_survive_per_kv_head(seed):
    """Whatever the scores, the kept token set is exactly the protected slots plus the top scorers, per kv
    head."""
    config = KVCompressionConfig(policy="h2o", budget=7, sink=1, window=2)
    cache, _, _ = _filled(20, 20)
    score = jax.random.uniform(jax.random.PRNGKey(seed), cache.score.shape)
    out = _compress(dataclasses.replace(cache, score=score), config, 7)
    for h in range(K):
        s = np.asarray(score[0, h, 1:18])
        top = set((np.argsort(-s)[:4] + 1).tolist())
        assert _kept_positions(out)[h] == sorted(top | {0, 18, 19})
        np.testing.assert_array_equal(out.score[0, h, :7], score[0, h, jnp.array(sorted(top | {0, 18, 19}))])


def test_nearest_merge_of_duplicate_tokens_is_lossless():
    """Evicted tokens identical to a kept one merge into it with count 2: attention output unchanged."""
    base = jax.random.normal(jax.random.PRNGKey(3), (B, 6, K, H))
    keys = jnp.concatenate([base, base[:, 1:3]], 1)  # tokens 6, 7 duplicate tokens 1, 2
    vals = jnp.concatenate([-base, -base[:, 1:3]], 1)
    score = jnp.zeros((B, K, 8)).at[:, :, :6].set(1.0)  # the duplicates score lowest
    config = KVCompressionConfig(policy="h2o", budget=6, sink=0, window=0, merge="nearest")
    cache, _, _ = _filled(8, 8, keys=keys, values=vals)
    out = _compress(dataclasses.replace(cache, score=score), config, 6)
    q = jax.random.normal(jax.random.PRNGKey(4), (B, 1, N, H))
    at = jnp.full((B, 1), 7)
    np.testing.assert_allclose(_attend(out, q, at), _attend(cache, q, at), rtol=1e-5, atol=1e-5)
    assert out.count[0, 0, :6].tolist() == [1, 2, 2, 1, 1, 1] and float(out.count.sum()) == 8 * K


def test_value_merge_keeps_keys_positions_counts():
    config = KVCompressionConfig(policy="h2o", budget=4, sink=0, window=0, merge="value")
    cache, _k, _v = _filled(6, 6)
    score = jnp.arange(6.0)[None, None].repeat(K, 1)  # keeps slots 2..5
    out = _compress(dataclasses.replace(cache, score=score), config, 4)
    np.testing.assert_array_equal(out.k[:, :, :4], cache.k[:, :, 2:])
    np.testing.assert_array_equal(out.count[:, :, :4], 1.0)
    assert _kept_positions(out) == [[2, 3, 4, 5]] * K
    assert not np.allclose(out.v[:, :, :4], cache.v[:, :, 2:])  # evicted values were mixed in


def test_centroid_merge_of_equal_keys_is_exact_and_keeps_mass():
    """Evicted tokens sharing one key attend exactly like their centroid (mean V, count n, log n on the
    logit)."""
    n = 10
    kk = jax.random.normal(jax.random.PRNGKey(5), (B, n, K, H)).at[:, 1:7].set(0.3)  # tokens 1..6: same key
    config = KVCompressionConfig(policy="h2o", budget=5, sink=1, window=3, merge="centroid", merge_slots=1)
    cache, _, _ = _filled(n, n + 1, keys=kk, config=config)
    out = _compress(cache, config, 5)  # keeps sink 0 and window 7..9; 1..6 -> centroid
    q = jax.random.normal(jax.random.PRNGKey(6), (B, 1, N, H))
    at = jnp.full((B, 1), n - 1)
    np.testing.assert_allclose(_attend(out, q, at), _attend(cache, q, at), rtol=1e-5, atol=1e-5)
    assert float(out.count[0, 0, 0]) == 6.0 and int(out.pos[0, 0, 0]) == 6  # tokens 1..6, newest 6
    assert float(out.count.sum()) == n * K


@pytest.mark.parametrize("mode", ["cumulative", "ema"])
def test_summary_slot_running_average(mode):
    config = KVCompressionConfig(policy="streaming", budget=4, sink=0, window=3, summary_slots=1,
                                 summary_mode=mode, summary_decay=0.5)
    cache, k, v = _filled(4, 6, config=config)  # slots 1..4 hold tokens 0..3
    cache = _compress(cache, config, 4)  # evicts token 0
    cache = _append(cache, k[:, :2] * 3, v[:, :2] * 3, jnp.array([[4, 5]]))
    cache = _compress(cache, config, 4)  # evicts tokens 1, 2
    if mode == "cumulative":
        expect = (v[0, 0] + v[0, 1] + v[0, 2]) / 3  # [K, H]: the exact mean of all three evicted tokens
    else:
        expect = 0.5 * v[0, 0] + 0.5 * (v[0, 1] + v[0, 2]) / 2  # first round fills, second moves halfway
    np.testing.assert_allclose(cache.v[0, :, 0], expect, rtol=1e-5, atol=1e-6)
    assert cache.count[0, :, 0].tolist() == [3.0] * K and cache.pos[0, :, 0].tolist() == [2] * K


def test_decode_with_compression_compiles_once():
    config = KVCompressionConfig(policy="h2o", budget=6, slack=2, sink=1, window=2, merge="nearest")
    n = 15
    q = jax.random.normal(jax.random.PRNGKey(7), (B, n, N, H))
    k = jax.random.normal(jax.random.PRNGKey(8), (B, n, K, H))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(cache, q_t, k_t, p_t):
        return kp.step(cache, config, q_t, k_t, k_t, p_t, budget=6)

    cache = kp.init_for(config, B, K, config.capacity_for(n), H, jnp.float32)
    for i in range(n):
        _, cache = step(cache, q[:, i:i + 1], k[:, i:i + 1], jnp.full((B, 1), i))
    assert int(cache.dropped) == 0 and int(kc.num_valid(cache).max()) <= 8
    assert float(cache.count.sum()) == n * K  # merged, never lost


def test_gqa_memory_is_kv_heads_times_budget():
    config = KVCompressionConfig(policy="snapkv", budget=40, sink=4, window=8)
    cache = kp.init_for(config, 2, 4, config.capacity_for(1000), 64, jnp.bfloat16)
    squeezed = kc.with_capacity(_compress(cache, config, 40), 40)
    assert kc.kv_nbytes(squeezed) == 2 * 2 * 4 * 40 * 64 * 2  # 2 (K and V) x B x K x budget x H x bf16


@pytest.mark.parametrize("kw, match", [
    ({"policy": "lru", "budget": 8}, "policy='lru': must be one of the allowed values; allowed: 'none', "),
    ({"policy": "h2o", "budget": 8, "window": 16}, "window=16"),
    ({"policy": "h2o"}, "exactly one of"),
    ({"policy": "h2o", "budget": 8, "ratio": 0.5}, "exactly one of"),
    ({"policy": "h2o", "ratio": 1.5}, r"ratio=1\.5: must be a number in \(0, 1\]"),
    ({"policy": "h2o", "budget": 64, "merge": "centroid"}, "merge_slots"),
    ({"policy": "h2o", "budget": 64, "pool_kernel": 4}, "pool_kernel"),
    ({"policy": "none", "budget": 64}, "keeps everything"),
    ({"policy": "h2o", "budget": 64, "quant": "int3"}, "quant='int3'"),
    ({"policy": "h2o", "budget": 64, "merge": "nearest", "summary_slots": 2}, "counted twice"),
])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        KVCompressionConfig(**kw)


def test_budget_larger_than_cache_raises():
    config = KVCompressionConfig(policy="h2o", budget=64)
    cache = kc.init_cache(1, 1, 32, 8, jnp.float32)
    with pytest.raises(ValueError, match="larger than the cache capacity"):
        kp.compress(cache, config, 64)
    with pytest.raises(ValueError, match="incoming"):
        kp.make_room(kc.init_cache(1, 1, 70, 8, jnp.float32), config, 64, incoming=8)


def test_budget_for_ratio_and_layers():
    assert KVCompressionConfig(policy="h2o", ratio=0.1).budget_for(8192) == 820
    assert KVCompressionConfig(policy="h2o", ratio=0.1, slack=16).capacity_for(8192) == 836
    assert KVCompressionConfig(policy="h2o", ratio=0.01).budget_for(100) == 36  # floor: the protected slots
    cfg = KVCompressionConfig(policy="snapkv", layer_budgets=(64, 48))
    assert [cfg.budget_for(1000, i) for i in (0, 1)] == [64, 48]
    with pytest.raises(ValueError, match="layer=2"):
        cfg.budget_for(1000, 2)


def test_scheduled_compression_equals_the_cond_in_the_step():
    # room=False + compress every `slack` steps on the host == make_room's cond inside every step.
    config = KVCompressionConfig(policy="h2o", budget=6, slack=3, sink=1, window=2)
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q, k, v = (jax.random.normal(kk, (B, 20, n, H)) for kk, n in zip(ks, (N, K, K), strict=True))
    with_cond = jax.jit(lambda c, *a: kp.step(c, config, *a, budget=6))
    plain = jax.jit(lambda c, *a: kp.step(c, config, *a, budget=6, room=False))
    squeeze = jax.jit(lambda c: kp.compress(c, config, 6))
    a = b = kp.init_for(config, B, K, 9, H, jnp.float32)
    for i in range(20):
        x = (q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], jnp.full((B, 1), i))
        out_a, a = with_cond(a, *x)
        if int(b.length) + 1 > b.capacity:
            b = squeeze(b)
        out_b, b = plain(b, *x)
        np.testing.assert_array_equal(out_a, out_b)
    assert _kept_positions(a) == _kept_positions(b)
