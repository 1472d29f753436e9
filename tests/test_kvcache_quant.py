"""int8/int4 KIVI-layout storage: round trips, real byte sizes, decode fidelity, composition with eviction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention.reference import dense_attention as _dense_eager
from selmerge_jax.kvcache import cache as kc
from selmerge_jax.kvcache import quant as kq
from selmerge_jax.kvcache.config import KVCompressionConfig

dense_attention = jax.jit(_dense_eager)  # one compile instead of one per eager primitive

B, K, G, H = 1, 2, 2, 16
N = K * G


def _data(n, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, n, N, H)), jax.random.normal(ks[1], (B, n, K, H)),
            jax.random.normal(ks[2], (B, n, K, H)))


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_half_a_step_and_int4_packs(bits):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8, 16)) * jnp.arange(1, 17)  # channel outliers
    codes, scale, zero = kq.quantize(x, bits, axis=2)  # per channel over 8 tokens, as for keys
    assert int(codes.max()) <= 2**bits - 1
    err = jnp.abs(kq.dequantize(codes, scale, zero, jnp.float32) - x)
    assert bool((err <= scale / 2 + 1e-5).all())
    np.testing.assert_array_equal(kq._unpack(kq._pack(codes, bits), bits), codes)
    assert kq._pack(codes, bits).shape[-1] == 16 * bits // 8


def _decode(config, n, capacity, budget, seed=0):
    q, k, v = _data(n, seed)
    qc = kq.init_quantized(config, B, K, capacity, H, jnp.float32)
    chex.clear_trace_counter()  # the counter is keyed by code location; each call of _decode is a fresh loop

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(c, q_t, k_t, v_t, p_t):
        return kq.quantized_step(c, config, q_t, k_t, v_t, p_t, budget=budget)

    outs = []
    for i in range(n):
        o, qc = step(qc, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], jnp.full((B, 1), i))
        outs.append(o)
    return jnp.concatenate(outs, 1), qc, (q, k, v)


@pytest.mark.parametrize("quant, tol", [("int8", 0.03), ("int4", 0.3)])
def test_quantized_decode_tracks_dense_and_keeps_recent_exact(quant, tol):
    config = KVCompressionConfig(policy="none", quant=quant, quant_group=4, quant_window=4)
    out, qc, (q, k, v) = _decode(config, 26, 32, 28)
    ref = dense_attention(q, k, v)
    err = float(jnp.abs(out - ref).max())
    assert err < tol
    assert int(qc.length) == 20 and int(qc.recent.length) == 6 and int(qc.recent.dropped) == 0
    np.testing.assert_array_equal(qc.recent.k[0, :, :6], k[0, 20:].transpose(1, 0, 2))  # full precision
    np.testing.assert_allclose(out[:, :4], ref[:, :4], rtol=1e-6, atol=1e-6)  # nothing quantized yet


def test_a_chunk_after_a_few_decode_steps_loses_no_token():
    # A flush when the window holds fewer than `flush` tokens used to set a negative cursor: the chunk was
    # written at wrapped (negative) slots beyond the cursor and later overwritten, silently losing tokens.
    config = KVCompressionConfig(policy="none", quant="int8", quant_group=4, quant_window=2)
    qc = kq.init_quantized(config, B, K, 32, H, jnp.float32, chunk=4)
    q, k, v = _data(16)
    step = jax.jit(lambda c, *a: kq.quantized_step(c, config, *a, budget=24))  # one compile per chunk size
    outs, i = [], 0
    for t in (1, 1, 1, 4, 1, 1, 4, 1, 1, 1):
        o, qc = step(qc, q[:, i:i + t], k[:, i:i + t], v[:, i:i + t], jnp.arange(i, i + t)[None])
        outs.append(o)
        i += t
        assert int(qc.recent.length) >= 0
    kept = np.concatenate([np.asarray(qc.pos[0, 0]), np.asarray(qc.recent.pos[0, 0])])
    assert sorted(kept[kept >= 0].tolist()) == list(range(16))
    err = float(jnp.abs(jnp.concatenate(outs, 1) - dense_attention(q, k, v)).max())
    assert err < 0.03


def test_quantized_storage_reports_real_bytes():
    for quant, code_bytes in (("int8", 16), ("int4", 8)):
        config = KVCompressionConfig(policy="none", quant=quant, quant_group=8, quant_window=8)
        qc = kq.init_quantized(config, 2, 4, 64, H, jnp.bfloat16)
        codes = 2 * 2 * 4 * 64 * code_bytes  # K and V codes: B x K x C x H x bits/8
        # key (per channel, per group) + value (per token)
        scales = 2 * (2 * 4 * 8 * H * 4) + 2 * (2 * 4 * 64 * 4)
        meta = 3 * 2 * 4 * 64 * 4 + 4  # pos, count, score, length
        window = kc.nbytes(qc.recent)
        assert kc.nbytes(qc) == codes + scales + meta + window
        assert qc.kq.nbytes == 2 * 4 * 64 * code_bytes


def test_quantization_composes_with_h2o_eviction():
    config = KVCompressionConfig(policy="h2o", budget=8, sink=1, window=2, quant="int8", quant_group=4,
                                 quant_window=4)
    out, qc, (_q, _k, _v) = _decode(config, 40, 12, 8, seed=1)
    assert int(qc.recent.dropped) == 0 and not bool(jnp.isnan(out).any())
    assert int((qc.pos >= 0).sum(-1).max()) <= 12 and float(qc.count.sum() + qc.recent.count.sum()) < 40 * K
    assert int(qc.pos.max()) >= 30  # the quantized store keeps receiving new groups after evicting


def test_init_quantized_rejects_bad_shapes():
    config = KVCompressionConfig(policy="none", quant="int4", quant_group=8)
    with pytest.raises(ValueError, match="multiple of quant_group"):
        kq.init_quantized(config, 1, 1, 20, 8)
    with pytest.raises(ValueError, match="head_dim=7"):
        kq.init_quantized(config, 1, 1, 16, 7)
    with pytest.raises(ValueError, match="quant"):
        kq.init_quantized(KVCompressionConfig(policy="none"), 1, 1, 16, 8)


def test_a_full_store_counts_exactly_the_tokens_it_drops():
    # policy "none", a store of 8 and a float window of 2 (+4 flush): 19 tokens arrive, 8 + 4 stay, 7 are
    # lost. The last flush moves a window holding 3 tokens (4 slots): its empty slot is not a lost token.
    config = KVCompressionConfig(policy="none", quant="int8", quant_group=4, quant_window=2)
    qc = kq.init_quantized(config, B, K, 8, H, jnp.float32, chunk=4)
    q, k, v = _data(19)
    step = jax.jit(lambda c, *a: kq.quantized_step(c, config, *a, budget=4))
    i = 0
    for t in (4, 4, 4, 3, 4):
        _, qc = step(qc, q[:, i:i + t], k[:, i:i + t], v[:, i:i + t], jnp.arange(i, i + t)[None])
        i += t
    stored = int((qc.pos[0, 0] >= 0).sum() + (qc.recent.pos[0, 0] >= 0).sum())
    assert stored == 12 and int(qc.recent.dropped) == 19 - stored
