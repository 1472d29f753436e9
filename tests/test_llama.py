"""The NNX Llama/Mistral decoder: preset sizes without allocation, config validation, masks, dtypes, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.models import Llama, ModelConfig, count_params, preset

SMALL = preset("tiny", vocab_size=64, d_model=32, ffn_dim=48)
_forward = nnx.jit(lambda model, tokens, positions=None, segment_ids=None: model(tokens, positions,
                                                                                segment_ids=segment_ids))


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 64, shape), jnp.int32)


@pytest.mark.parametrize("name, expected", [("llama2-7b", 6_738_415_616), ("llama3-8b", 8_030_261_248)])
def test_preset_sizes_from_eval_shape(name, expected):
    model = nnx.eval_shape(lambda: Llama(preset(name), rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    assert count_params(model) == expected
    if name == "llama2-7b":
        assert round(expected / 1e9, 2) == 6.74


@pytest.mark.parametrize("changes, message", [
    ({"attention": "ring", "sliding_window": 64}, "sliding_window"),
    ({"attention": "flash"}, "allowed"),
    ({"num_kv_heads": 3}, "multiple of num_kv_heads=3"),
    ({"dtype": "fp8"}, "ModelConfig.dtype='fp8'"),
    ({"remat": "sometimes"}, "ModelConfig.remat"),
    ({"attention": "ms", "sliding_window": 64}, "sliding_window"),
    ({"head_dim": 7}, "must be even"),
    ({"vocab_size": 0}, "ModelConfig.vocab_size=0: must be a positive int"),
    ({"norm_eps": -1.0}, "norm_eps"),
])
def test_bad_configs_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        SMALL.replace(**changes)


def test_unknown_preset_and_wrong_types():
    with pytest.raises(ValueError, match="preset='gpt2': must be one of the allowed values; allowed: 'tiny'"):
        preset("gpt2")
    with pytest.raises(TypeError, match="RopeConfig"):
        SMALL.replace(rope={"rope_type": "default"})
    with pytest.raises(ValueError, match="tokens must be int"):
        nnx.eval_shape(lambda: Llama(SMALL, rngs=nnx.Rngs(0)))(jnp.zeros((2, 3), jnp.float32))


@pytest.fixture(scope="module")
def model():
    return Llama(SMALL, rngs=nnx.Rngs(0))


def test_forward_is_causal(model):
    tokens = _tokens((2, 24))
    changed = tokens.at[:, 15:].set((tokens[:, 15:] + 1) % 64)
    a, b = _forward(model, tokens), _forward(model, changed)
    assert a.shape == (2, 24, 64) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a[:, :15], b[:, :15])
    assert np.abs(np.asarray(a[:, 15:] - b[:, 15:])).max() > 1e-3


def test_ms_attention_equals_dense_when_everything_is_selected(model):
    # 32 tokens = 4 regions of 8; a group has at most 3 candidates = top_k - merge, so it attends to all.
    ms = Llama(SMALL.replace(attention="ms", ms=MSAttentionConfig(block_size=8, top_k=4)), rngs=nnx.Rngs(0))
    tokens = _tokens((2, 32), 1)
    np.testing.assert_allclose(_forward(ms, tokens), _forward(model, tokens), atol=2e-5)


def test_sparse_ms_attention_is_causal_with_previous_selection():
    cfg = SMALL.replace(attention="ms",
                        ms=MSAttentionConfig(block_size=8, top_k=3, selection_source="previous",
                                             selection_heads="kv"))
    ms = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens((1, 64), 2)
    a = _forward(ms, tokens)
    b = _forward(ms, tokens.at[:, 40:].set(0))
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(a[:, :40], b[:, :40])


def test_segment_ids_isolate_packed_sequences(model):
    x, y = _tokens((1, 10), 3), _tokens((1, 14), 4)
    packed = jnp.concatenate([x, y], axis=1)
    positions = jnp.concatenate([jnp.arange(10), jnp.arange(14)])[None]
    segments = jnp.concatenate([jnp.zeros(10, jnp.int32), jnp.ones(14, jnp.int32)])[None]
    out = _forward(model, packed, positions, segments)
    alone = jnp.concatenate([_forward(model, x), _forward(model, y)], axis=1)
    np.testing.assert_allclose(out, alone, atol=1e-5)


def test_sliding_window_hides_old_tokens():
    one_layer = Llama(SMALL.replace(num_layers=1, sliding_window=6), rngs=nnx.Rngs(0))
    tokens = _tokens((1, 20), 5)
    base = _forward(one_layer, tokens)[0, 19]
    outside = _forward(one_layer, tokens.at[0, 13].set((tokens[0, 13] + 1) % 64))[0, 19]  # 19 - 13 = W
    inside = _forward(one_layer, tokens.at[0, 14].set((tokens[0, 14] + 1) % 64))[0, 19]
    np.testing.assert_array_equal(base, outside)
    assert np.abs(np.asarray(base - inside)).max() > 1e-4


def test_bf16_compute_keeps_f32_params(model):
    bf16 = Llama(SMALL.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nnx.state(bf16, nnx.Param)))
    tokens = _tokens((2, 16), 6)
    low, high = _forward(bf16, tokens), _forward(model, tokens)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.05)  # random tiny model: logits are O(0.1)


def test_remat_gives_the_same_gradients():
    plain = Llama(SMALL.replace(num_layers=1), rngs=nnx.Rngs(0))
    remat = Llama(SMALL.replace(num_layers=1, remat="full"), rngs=nnx.Rngs(0))
    tokens = _tokens((2, 12), 7)

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(m)

    g1, g2 = grads(plain), grads(remat)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_config_is_hashable_and_frozen():
    assert hash(SMALL) == hash(preset("tiny", vocab_size=64, d_model=32, ffn_dim=48))
    with pytest.raises(AttributeError):
        SMALL.d_model = 3  # type: ignore[misc]
    assert isinstance(SMALL, ModelConfig) and SMALL.head_size == 8
