"""CRD NTK: stage schedule, base formula (hand values from the draft's logs), cyclic positions, offset
distribution, the inference rule, and one trace across stage changes inside a jitted training step."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from selmerge_jax.layers import AttentionLayerConfig, MSAttention
from selmerge_jax.positional import RopeConfig, apply_rope, make_position_fn, rope_frequencies
from selmerge_jax.positional.crd_ntk import (
    CRDNTKConfig,
    CRDNTKFn,
    CRDPositions,
    crd_base,
    crd_offsets,
    crd_positions,
    crd_scale,
    crd_step,
)


def test_stage_schedule_gives_expected_scales():
    cfg = CRDNTKConfig(initial_scale=16.0, growth=2.0, stage_steps=2000)
    steps = jnp.array([0, 1, 1999, 2000, 3999, 4000, 5999, 6000])
    scales = jax.vmap(lambda s: crd_scale(cfg, s))(steps)
    np.testing.assert_array_equal(scales, [16, 16, 16, 32, 32, 64, 64, 128])
    capped = CRDNTKConfig(initial_scale=16.0, growth=2.0, stage_steps=10, max_scale=40.0)
    assert float(crd_scale(capped, 25)) == 40.0 and float(crd_scale(capped, 15)) == 32.0
    assert float(crd_scale(CRDNTKConfig(growth=1, initial_scale=8.0), 10**6)) == 8.0


@pytest.mark.parametrize("cycle, scale, want", [
    (16384, 16, 5.21e5), (16384, 32, 1.04e6), (16384, 64, 2.10e6),  # the draft's HF dynamic NTK at L = 16K
    (32768, 4096, 3.37e8),  # the logged Mod32K run, "ntkscale 4096"
])
def test_base_matches_values_computed_in_the_research_notes(cycle, scale, want):
    cfg = CRDNTKConfig(cycle=cycle, original_max_position_embeddings=4096)
    got = float(crd_base(cfg, scale, 128))
    assert math.isclose(got, want, rel_tol=5e-3)
    assert math.isclose(got, 1e4 * (scale * cycle / 4096 - (scale - 1)) ** (128 / 126), rel_tol=1e-5)


@pytest.mark.parametrize("a, want", [(1024, 1.14e7), (4096, 4.67e7), (16384, 1.91e8)])
def test_inference_rule_base(a, want):
    rope = CRDNTKConfig(inference_scale=float(a)).inference_rope_config()
    assert rope.rope_type == "ntk" and math.isclose(rope.ntk_base(128), want, rel_tol=5e-3)


@settings(max_examples=30, deadline=None)
@given(cycle=st.integers(8, 5000), seq_len=st.integers(1, 300), wrap=st.booleans(),
       seed=st.integers(0, 2**30))
def test_positions_stay_in_cycle(cycle, seq_len, wrap, seed):
    cfg = CRDNTKConfig(cycle=cycle, wrap=wrap)
    if not wrap and seq_len > cycle:
        with pytest.raises(ValueError, match="cycle"):
            crd_offsets(cfg, jax.random.PRNGKey(seed), 3, seq_len)
        return
    offsets = crd_offsets(cfg, jax.random.PRNGKey(seed), 3, seq_len)
    pos = np.asarray(crd_positions(cfg, offsets, seq_len))
    assert pos.shape == (3, seq_len) and pos.dtype == np.int32
    assert pos.min() >= 0 and pos.max() < cycle
    np.testing.assert_array_equal(np.diff(pos, axis=1) % cycle, 1)  # consecutive modulo C
    np.testing.assert_array_equal(pos[:, 0], np.asarray(offsets) % cycle)
    if not wrap:
        assert (np.diff(pos, axis=1) == 1).all()  # truncated: never wraps


def _uniformity_chi2(samples, low, high, bins=10):
    counts, _ = np.histogram(samples, bins=bins, range=(low, high))
    expected = len(samples) / bins
    return ((counts - expected) ** 2 / expected).sum()


@pytest.mark.parametrize("wrap, max_offset, low, high", [
    (True, None, 0, 32768),  # default: a uniform phase in the cycle
    (True, 4 * 2**20, 0, 4 * 2**20),  # the draft's U[0, 4M) before the modulo
    (False, None, 0, 32768 - 16384 + 1),  # truncated: the window fits in [0, C)
])
def test_offsets_follow_the_configured_distribution(wrap, max_offset, low, high):
    cfg = CRDNTKConfig(cycle=32768, wrap=wrap, max_offset=max_offset)
    off = np.asarray(crd_offsets(cfg, jax.random.PRNGKey(3), 20000, 16384)).astype(np.int64)
    assert off.min() >= low and off.max() < high
    span = high - low
    assert off.min() < low + 0.01 * span and off.max() > high - 0.01 * span  # the whole range is used
    assert abs(off.mean() - (low + high - 1) / 2) < 0.02 * (high - low)
    assert _uniformity_chi2(off, low, high) < 27.9  # chi2(9 dof) at p = 0.001


def test_inference_fn_is_fixed_ntk_with_unwrapped_positions():
    cfg = CRDNTKConfig(inference_scale=64.0, cycle=64)
    fn = CRDNTKFn(cfg, 16)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 200, 2, 16)), jnp.float32)
    pos = jnp.arange(200)[None] + 10_000  # beyond the cycle: not wrapped at inference
    qr, _ = fn(q, q, pos)
    inv, _ = rope_frequencies(RopeConfig(rope_type="ntk", factor=64.0), 16)
    np.testing.assert_allclose(qr, apply_rope(q, pos, inv), rtol=1e-5, atol=1e-6)


def test_training_fn_uses_traced_step_frequencies():
    cfg = CRDNTKConfig(cycle=64, original_max_position_embeddings=16, stage_steps=5)
    state = crd_step(cfg, jnp.int32(7), jax.random.PRNGKey(0), batch=2, seq_len=32, head_dim=8)
    assert float(state.scale) == 32.0
    np.testing.assert_allclose(state.base, 1e4 * (32 * 4 - 31) ** (8 / 6), rtol=1e-5)
    np.testing.assert_allclose(state.inv_freq, float(state.base) ** (-np.arange(0, 8, 2) / 8), rtol=1e-5)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 1, 8))
    qr, _ = CRDNTKFn(cfg, 8)(x, x, state)
    np.testing.assert_allclose(qr, apply_rope(x, state.positions, state.inv_freq), rtol=1e-6)
    # a model's plain RopeFn takes the same CRDPositions (their traced frequencies win over its config's)
    qr2, _ = jax.jit(make_position_fn(RopeConfig(), 8))(x, x, state)
    np.testing.assert_allclose(qr2, qr, rtol=1e-5, atol=1e-6)


def test_one_trace_across_stage_changes_in_a_jitted_step():
    cfg = CRDNTKConfig(cycle=256, original_max_position_embeddings=64, stage_steps=3, initial_scale=2.0)
    # Dense attention keeps compilation short; the hook and the traced schedule are what is under test.
    layer_cfg = AttentionLayerConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation="dense")
    model = MSAttention(layer_cfg, rngs=nnx.Rngs(0), position_fn=CRDNTKFn(cfg, 8))
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 32))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, step, key):
        def loss(p):
            pos = crd_step(cfg, step, key, batch=2, seq_len=64, head_dim=8)
            return jnp.mean(nnx.merge(graphdef, p)(x, pos) ** 2), pos.scale
        (value, scale), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, scale, grads

    out = [train_step(params, jnp.int32(s), jax.random.PRNGKey(s)) for s in (2, 3, 6, 7)]
    assert [float(o[1]) for o in out] == [2.0, 4.0, 8.0, 8.0]  # three stages, one compilation
    assert all(np.isfinite(float(o[0])) for o in out)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cycle=0), "cycle"),
    (dict(initial_scale=-1.0), "initial_scale"),
    (dict(growth=0.5), "growth"),
    (dict(stage_steps=0), "stage_steps"),
    (dict(max_offset=5, wrap=False), "max_offset"),
    (dict(inference_scale=0.0), "inference_scale"),
    (dict(layout="spiral"), "layout"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CRDNTKConfig(**kwargs)


def test_bad_call_arguments_raise():
    with pytest.raises(ValueError, match="head_dim"):
        CRDNTKFn(CRDNTKConfig(), 9)
    with pytest.raises(ValueError, match="cycle"):
        crd_positions(CRDNTKConfig(cycle=16, wrap=False), jnp.zeros(1, jnp.int32), 32)
    assert isinstance(crd_step(CRDNTKConfig(), 0, jax.random.PRNGKey(0), batch=1, seq_len=4, head_dim=8),
                      CRDPositions)


def test_crd_forward_on_a_packed_batch_matches_each_document_alone():
    """With document masking, a document packed after another gets the logits it gets alone: the segment mask
    hides the first document and its positions restart at the row's cycle offset (same key -> same offset)."""
    from selmerge_jax.main.finetune import crd_forward
    from selmerge_jax.models.config import preset
    from selmerge_jax.models.llama import Llama
    from selmerge_jax.training.train_step import StepContext

    model = Llama(preset("tiny", d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64,
                         attention="dense"), rngs=nnx.Rngs(0))
    forward = crd_forward(CRDNTKConfig(cycle=64, original_max_position_embeddings=16, initial_scale=4.0))
    ctx = StepContext(step=jnp.int32(3), key=jax.random.PRNGKey(5))
    rng = np.random.default_rng(0)
    first, second = rng.integers(3, 200, 10), rng.integers(3, 200, 14)
    packed = {"tokens": jnp.asarray(np.concatenate([first, second])[None], jnp.int32),
              "positions": jnp.asarray(np.concatenate([np.arange(10), np.arange(14)])[None], jnp.int32),
              "segment_ids": jnp.asarray(np.repeat([1, 2], [10, 14])[None], jnp.int32)}
    alone = _logits(forward(model, {"tokens": jnp.asarray(second[None], jnp.int32)}, ctx))
    together = _logits(forward(model, packed, ctx))
    np.testing.assert_allclose(together[0, 10:], alone[0], rtol=1e-5, atol=1e-5)
    # and without the mask the second document does see the first: the test can fail
    unmasked = _logits(forward(model, {"tokens": packed["tokens"], "positions": packed["positions"]}, ctx))
    assert not np.allclose(unmasked[0, 10:], alone[0], atol=1e-3)


def _logits(out):
    """The CRD forward returns final hidden states and the head (the loss is chunked); logits for the
    checks."""
    return out.head(out.h)


def test_crd_positions_rejects_base_positions_of_the_wrong_length():
    with pytest.raises(ValueError, match="base_positions must be int"):
        crd_positions(CRDNTKConfig(cycle=64), jnp.zeros(1, jnp.int32), 8, jnp.zeros((1, 7), jnp.int32))


def test_crd_forward_runs_through_the_models_remat_policy():
    """CRDPositions go through ``Llama.__call__``, so ``model.remat`` applies: same logits and gradients with
    and without rematerialisation, and the rematerialised step's jaxpr holds the remat (checkpoint) op."""
    from selmerge_jax.main.finetune import crd_forward
    from selmerge_jax.models.config import preset
    from selmerge_jax.models.llama import Llama
    from selmerge_jax.training.train_step import StepContext

    forward = crd_forward(CRDNTKConfig(cycle=64, original_max_position_embeddings=16, initial_scale=4.0))
    ctx = StepContext(step=jnp.int32(0), key=jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 16)), jnp.int32)

    def loss_and_grads(remat):
        cfg = preset("tiny", d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64,
                     attention="dense", remat=remat)
        graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.mean(_logits(forward(nnx.merge(graphdef, p), {"tokens": tokens}, ctx)) ** 2)
        return jax.value_and_grad(loss)(params), jax.make_jaxpr(jax.grad(loss))(params)

    (plain, g_plain), _ = loss_and_grads("none")
    (remat, g_remat), jaxpr = loss_and_grads("full")
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    chex.assert_trees_all_close(g_remat, g_plain, rtol=1e-5, atol=1e-6)
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_model_rejects_rotary_positions_of_the_wrong_shape():
    from selmerge_jax.models.config import preset
    from selmerge_jax.models.llama import Llama

    model = Llama(preset("tiny", d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=64),
                  rngs=nnx.Rngs(0))
    pos = crd_step(CRDNTKConfig(cycle=64), 0, jax.random.PRNGKey(0), batch=1, seq_len=8, head_dim=16)
    with pytest.raises(ValueError, match=r"positions must be int \[B=1, T=4\]"):
        model(jnp.zeros((1, 4), jnp.int32), pos)
