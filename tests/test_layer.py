"""The NNX layer: jit/nnx.jit, implementations agree where they must, bad configs and inputs are rejected."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.layers import AttentionLayerConfig, MSAttention


def _layer(implementation="reference", top_k=4, **kw):
    ms = MSAttentionConfig(selection_source="group", block_size=8, top_k=top_k, merge=2)
    cfg = AttentionLayerConfig(d_model=32, num_heads=4, num_kv_heads=2, ms=ms, implementation=implementation,
                               **kw)
    return MSAttention(cfg, rngs=nnx.Rngs(0))


def test_jax_jit_and_nnx_jit_agree_with_eager():
    layer = _layer()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 50, 32))
    eager = layer(x)
    graphdef, state = nnx.split(layer)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    nnx_jitted = nnx.jit(lambda m, x: m(x))(layer, x)
    assert eager.shape == (2, 50, 32)
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    np.testing.assert_allclose(nnx_jitted, eager, atol=1e-5)


def test_ms_layer_equals_dense_layer_when_budget_covers_sequence():
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 48, 32))
    ms, dense = _layer("reference", top_k=6), _layer("dense", top_k=6)
    np.testing.assert_allclose(ms(x), dense(x), atol=1e-5)


def test_layer_gradients_flow_to_every_projection():
    layer = _layer()
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 64, 32))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert jnp.any(g != 0), path


def test_jitted_layer_traces_once_across_steps():
    layer = _layer()
    graphdef, state = nnx.split(layer)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, x):
        return nnx.merge(graphdef, state)(x)

    for i in range(3):
        step(state, jnp.full((1, 32, 32), float(i))).block_until_ready()


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=30, num_heads=4), "d_model=30 is not divisible by num_heads=4"),
    (dict(d_model=32, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads=3"),
    (dict(d_model=32, num_heads=0), "AttentionLayerConfig.num_heads=0: must be a positive int"),
    (dict(d_model=32, num_heads=True), "AttentionLayerConfig.num_heads=True: must be a positive int"),
    (dict(d_model=32, num_heads=4, implementation="flash"), "implementation='flash'"),
])
def test_bad_layer_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionLayerConfig(**kwargs)


def test_bad_layer_input():
    with pytest.raises(ValueError, match=r"x must be \[B, T, D=32\]"):
        _layer()(jnp.ones((2, 16, 31)))
