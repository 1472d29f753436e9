"""The cache pytree: append/attend against the dense oracle, GQA storage size, overflow, padding,
compaction."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention.reference import dense_attention as _dense_eager
from selmerge_jax.kvcache import cache as kc

# Jitted wrappers: one compile per shape instead of one per eager primitive (keeps the CPU suite fast).
dense_attention = jax.jit(_dense_eager, static_argnames=("causal", "return_lse"))
_append = jax.jit(kc.append)
_attend = jax.jit(kc.attend, static_argnames=("return_probs",))

B, K, G, H = 2, 2, 3, 8
N = K * G


def _qkv(key, t, s):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, t, N, H)), jax.random.normal(kk, (B, s, K, H)),
            jax.random.normal(kv, (B, s, K, H)))


def test_prefill_then_decode_matches_dense(key):
    s = 12
    q, k, v = _qkv(key, s, s)
    pos = jnp.broadcast_to(jnp.arange(s), (B, s))
    cache = kc.init_cache(B, K, 16, H, jnp.float32)
    cache = _append(cache, k[:, :8], v[:, :8], pos[:, :8])
    out_prefill = _attend(cache, q[:, :8], pos[:, :8])
    outs = [out_prefill]
    for i in range(8, s):  # token-by-token decode
        cache = _append(cache, k[:, i:i + 1], v[:, i:i + 1], pos[:, i:i + 1])
        outs.append(_attend(cache, q[:, i:i + 1], pos[:, i:i + 1]))
    np.testing.assert_allclose(jnp.concatenate(outs, 1), dense_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert int(cache.length) == s and int(kc.num_valid(cache).min()) == s


def test_probs_and_lse_match_dense(key):
    q, k, v = _qkv(key, 4, 4)
    pos = jnp.broadcast_to(jnp.arange(4), (B, 4))
    cache = _append(kc.init_cache(B, K, 6, H, jnp.float32), k, v, pos)
    _out, probs, lse = _attend(cache, q, pos, return_probs=True)
    _, lse_ref = dense_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)
    assert probs.shape == (B, K, G, 4, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.abs(probs[..., 4:]).max()) == 0.0  # empty slots get nothing
    assert float(jnp.triu(probs[..., :4], 1).max()) == 0.0  # causal by position


def test_gqa_storage_is_kv_heads_times_capacity():
    cache = kc.init_cache(3, 4, 100, 16, jnp.bfloat16)
    assert kc.kv_nbytes(cache) == 2 * 3 * 4 * 100 * 16 * 2
    meta = 3 * 4 * 100 * (4 + 4 + 4) + 4 + 4  # pos int32, count f32, score f32, length, dropped
    assert kc.nbytes(cache) == kc.kv_nbytes(cache) + meta


def test_merged_slot_count_equals_duplicated_tokens(key):
    """A slot with count n and key k weighs exactly like n identical copies of (k, v)."""
    q, k, v = _qkv(key, 1, 3)
    dup_k = jnp.concatenate([k, k[:, 1:2], k[:, 1:2]], 1)
    dup_v = jnp.concatenate([v, v[:, 1:2], v[:, 1:2]], 1)
    ref = dense_attention(q, dup_k, dup_v, causal=False)
    cache = _append(kc.init_cache(B, K, 4, H, jnp.float32), k, v, jnp.zeros((B, 3), jnp.int32))
    cache = kc.KVCache(**{**cache.__dict__, "count": cache.count.at[:, :, 1].set(3.0)})
    np.testing.assert_allclose(_attend(cache, q, jnp.zeros((B, 1), jnp.int32)), ref, rtol=1e-5, atol=1e-5)


def test_padding_positions_are_never_attended(key):
    q, k, v = _qkv(key, 1, 4)
    pos = jnp.array([[0, 1, 2, 3], [-1, -1, 0, 1]])  # row 1 is left-padded
    cache = _append(kc.init_cache(B, K, 4, H, jnp.float32), k, v, pos)
    out = _attend(cache, q, jnp.array([[3], [1]]))
    ref1 = dense_attention(q[1:], k[1:, 2:], v[1:, 2:])
    np.testing.assert_allclose(out[1:], ref1, rtol=1e-5, atol=1e-5)
    assert kc.num_valid(cache).tolist() == [[4, 4], [2, 2]]


def test_query_that_sees_nothing_gives_zero_not_nan(key):
    q, k, v = _qkv(key, 1, 2)
    cache = _append(kc.init_cache(B, K, 2, H, jnp.float32), k, v, jnp.full((B, 2), 5))
    out = _attend(cache, q, jnp.zeros((B, 1), jnp.int32))
    assert not bool(jnp.isnan(out).any()) and float(jnp.abs(out).max()) == 0.0


def test_overflow_raises_eagerly_and_drops_under_jit(key):
    _, k, v = _qkv(key, 1, 3)
    cache = kc.append(kc.init_cache(B, K, 2, H, jnp.float32), k[:, :2], v[:, :2],
                      jnp.zeros((B, 2), jnp.int32))
    with pytest.raises(ValueError, match="overflow"):
        kc.append(cache, k[:, 2:], v[:, 2:], jnp.zeros((B, 1), jnp.int32))
    jitted = jax.jit(kc.append)(cache, k[:, 2:], v[:, 2:], jnp.ones((B, 1), jnp.int32))
    assert int(jitted.dropped) == 1 and int(jitted.length) == 2
    np.testing.assert_array_equal(jitted.k, cache.k)


@pytest.mark.parametrize("bad, match", [
    ({"batch": 0}, "batch"), ({"capacity": -1}, "capacity"), ({"dtype": jnp.int8}, "floating")])
def test_init_cache_rejects_bad_args(bad, match):
    args = {"batch": 1, "kv_heads": 1, "capacity": 4, "head_dim": 8, "dtype": jnp.float32} | bad
    with pytest.raises((ValueError, TypeError), match=match):
        kc.init_cache(**args)


def test_append_rejects_bad_shapes(key):
    _, k, v = _qkv(key, 1, 2)
    cache = kc.init_cache(B, K, 4, H, jnp.float32)
    with pytest.raises(ValueError, match="k_new"):
        _append(cache, k[:, :, :1], v, jnp.zeros((B, 2), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        _append(cache, k, v, jnp.zeros((B, 3), jnp.int32))


def test_gather_and_with_capacity(key):
    _, k, v = _qkv(key, 1, 4)
    cache = _append(kc.init_cache(B, K, 4, H, jnp.float32), k, v, jnp.broadcast_to(jnp.arange(4), (B, 4)))
    idx = jnp.broadcast_to(jnp.array([3, 1, -1]), (B, K, 3))
    g = kc.gather_slots(cache, idx, length=2)
    assert g.capacity == 3 and g.pos[0, 0].tolist() == [3, 1, -1] and int(g.length) == 2
    np.testing.assert_array_equal(g.k[:, :, 0], cache.k[:, :, 3])
    grown = kc.with_capacity(g, 5)
    assert grown.capacity == 5 and grown.pos[0, 0].tolist() == [3, 1, -1, -1, -1]
    chex.assert_trees_all_equal_shapes(kc.with_capacity(grown, 3), g)


def test_decode_loop_compiles_once(key):
    q, k, v = _qkv(key, 6, 6)

    @functools.partial(jax.jit, donate_argnums=0)  # a fresh cache must be donatable (distinct k/v buffers)
    @chex.assert_max_traces(n=1)
    def step(cache, q_t, k_t, v_t, p_t):
        cache = _append(cache, k_t, v_t, p_t)
        return cache, _attend(cache, q_t, p_t)

    cache = kc.init_cache(B, K, 6, H, jnp.float32)
    for i in range(6):
        p = jnp.full((B, 1), i, jnp.int32)
        cache, _ = step(cache, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], p)
    assert int(cache.length) == 6


def test_partial_overflow_under_jit_keeps_the_tokens_that_fit(key):
    # length C-1 and T=3: the first token takes the last slot, two are dropped, every older slot is unchanged.
    _, k, v = _qkv(key, 1, 6)
    pos = jnp.broadcast_to(jnp.arange(6), (B, 6))
    cache = _append(kc.init_cache(B, K, 4, H, jnp.float32), k[:, :3], v[:, :3], pos[:, :3])
    out = _append(cache, k[:, 3:], v[:, 3:], pos[:, 3:])
    assert int(out.dropped) == 2 and int(out.length) == 4
    np.testing.assert_array_equal(out.k[:, :, :3], cache.k[:, :, :3])
    np.testing.assert_array_equal(out.k[:, :, 3], k[:, 3])
    np.testing.assert_array_equal(out.v[:, :, 3], v[:, 3])
    np.testing.assert_array_equal(out.pos[:, :, :], jnp.broadcast_to(jnp.arange(4), (B, K, 4)))


def test_bf16_cache_attends_in_bf16_with_float32_accumulation(key):
    # The value product runs on the bf16 cache (no float32 copy of V); it stays within bf16 rounding of
    # float32.
    s = 64
    q, k, v = _qkv(key, 1, s)
    pos = jnp.broadcast_to(jnp.arange(s), (B, s))
    ref = _attend(_append(kc.init_cache(B, K, s, H, jnp.float32), k, v, pos), q, pos[:, -1:])
    half = _append(kc.init_cache(B, K, s, H, jnp.bfloat16), k, v, pos)
    got = _attend(half, q.astype(jnp.bfloat16), pos[:, -1:])
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=3e-2)
    jaxpr = str(jax.make_jaxpr(kc.attend)(half, q.astype(jnp.bfloat16), pos[:, -1:]))
    assert f"f32[{B},{K},{s},{H}]" not in jaxpr  # no float32 copy of the cache anywhere in the step


@pytest.mark.parametrize("field, bad", [(1, (B, K, 5, H)), (2, (B, K, 1)), (3, (B, K, 1))])
def test_segments_reject_mismatched_v_pos_count(key, field, bad):
    _, k, v = _qkv(key, 1, 6)
    q = jnp.zeros((B, 1, N, H))
    seg = [k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.zeros((B, K, 6), jnp.int32),
           jnp.ones((B, K, 6))]
    seg[field] = jnp.zeros(bad, seg[field].dtype)  # pos/count [B, K, 1] would broadcast over all 6 slots
    with pytest.raises(ValueError, match="segment 0: v must match k"):
        kc.attend_segments(q, jnp.zeros((B, 1), jnp.int32), [tuple(seg)])


def test_segments_equal_one_concatenated_store(key):
    q, k, v = _qkv(key, 3, 10)
    # an empty slot in the first segment
    pos = jnp.broadcast_to(jnp.arange(10), (B, K, 10)).at[:, :, 4].set(-1)
    count = jnp.where(pos >= 0, 1.0, 0.0).at[:, :, 2].set(3.0)  # and a merged one
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    qpos = jnp.broadcast_to(jnp.arange(7, 10), (B, 3))
    ref = kc.attend_slots(q, qpos, kk, vv, pos, count, return_probs=True, window=6)
    split = [(kk[:, :, :6], vv[:, :, :6], pos[..., :6], count[..., :6]),
             (kk[:, :, 6:], vv[:, :, 6:], pos[..., 6:], count[..., 6:])]
    got = kc.attend_segments(q, qpos, split, return_probs=True, window=6)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
