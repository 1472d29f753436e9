"""LoRA: identity at init, what trains, merge/unmerge, adapter files alone, export guard, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from safetensors.numpy import load_file

from selmerge_jax.models import Llama, preset, save_hf
from selmerge_jax.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
    trainable_filter,
    unmerge_lora,
)

SMALL = preset("tiny", vocab_size=64, d_model=32, ffn_dim=48)
_forward = nnx.jit(lambda model, tokens: model(tokens))
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)), jnp.int32)
CFG = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), train_embeddings=True,
                 train_norms=True)


def _paths(state) -> set[str]:
    return {".".join(map(str, p)) for p in traverse_util.flatten_dict(nnx.to_pure_dict(state))}


def _perturb(model, seed=1):
    """Non-zero B matrices, as after some training steps."""
    for i, (_, module) in enumerate(m for m in nnx.iter_graph(model) if isinstance(m[1], LoRALinear)):
        module.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed + i), module.lora_b.shape)


@pytest.fixture
def adapted():
    base = Llama(SMALL, rngs=nnx.Rngs(0))
    reference = _forward(base, TOKENS)
    return apply_lora(base, CFG, rngs=nnx.Rngs(1)), reference


def test_fresh_adapters_are_an_identity(adapted):
    model, reference = adapted
    np.testing.assert_array_equal(_forward(model, TOKENS), reference)
    # stacked layers: one module, [L, ...] weights
    assert isinstance(model.layers.self_attn.q_proj, LoRALinear)
    assert not isinstance(model.layers.self_attn.k_proj, LoRALinear)
    assert model.layers.self_attn.q_proj.lora_a.shape == (SMALL.num_layers, 32, 4)
    assert model.layers.self_attn.q_proj.lora_a.dtype == jnp.float32


def test_trainable_filter_selects_adapters_embeddings_and_norms(adapted):
    model, _ = adapted
    paths = _paths(nnx.state(model, trainable_filter(CFG)))
    assert "layers.self_attn.q_proj.lora_a" in paths and "layers.mlp.down_proj.lora_b" in paths
    assert {"embed_tokens.embedding", "lm_head.kernel", "norm.weight",
            "layers.input_layernorm.weight"} <= paths
    assert not any(p.endswith("proj.kernel") for p in paths)  # frozen base projections
    only_lora = _paths(nnx.state(model, trainable_filter(LoRAConfig(rank=4, targets=CFG.targets))))
    assert only_lora and all(p.endswith(("lora_a", "lora_b")) for p in only_lora)


def test_gradients_reach_only_what_trains(adapted):
    model, _ = adapted
    _perturb(model)
    wrt = trainable_filter(CFG)
    loss = lambda m: jnp.mean(m(TOKENS) ** 2)
    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, wrt)))(model)
    assert _paths(grads) == _paths(nnx.state(model, wrt))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_merge_and_unmerge(adapted):
    model, reference = adapted
    kernel = np.asarray(model.layers.self_attn.q_proj.kernel[0])
    _perturb(model)
    adapted_logits = _forward(model, TOKENS)
    assert np.abs(np.asarray(adapted_logits - reference)).max() > 1e-3
    merge_lora(model)
    assert not np.array_equal(np.asarray(model.layers.self_attn.q_proj.kernel[0]), kernel)
    np.testing.assert_allclose(_forward(model, TOKENS), adapted_logits, atol=1e-5)
    unmerge_lora(model)
    np.testing.assert_allclose(model.layers.self_attn.q_proj.kernel[0], kernel, atol=1e-6)
    np.testing.assert_allclose(_forward(model, TOKENS), adapted_logits, atol=1e-5)


def test_adapters_save_and_load_alone(adapted, tmp_path):
    model, _ = adapted
    _perturb(model)
    save_adapters(model, CFG, str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert not any(n.endswith("k_proj.weight") or "q_proj.weight" in n for n in tensors)  # no frozen weights
    fresh = Llama(SMALL, rngs=nnx.Rngs(0))
    assert load_adapters(fresh, str(tmp_path)) == CFG
    np.testing.assert_array_equal(_forward(fresh, TOKENS), _forward(model, TOKENS))


def test_lora_only_file_is_small(adapted, tmp_path):
    model, _ = adapted
    cfg = LoRAConfig(rank=2, targets=("q_proj", "v_proj"))
    save_adapters(apply_lora(Llama(SMALL, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(2)), cfg, str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * SMALL.num_layers  # A and B, 2 targets, every layer
    assert sum(t.size for t in tensors.values()) < 0.05 * sum(
        x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def test_load_rejects_mismatched_adapters(adapted, tmp_path):
    model, _ = adapted
    save_adapters(model, CFG, str(tmp_path))
    other = apply_lora(Llama(SMALL, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, targets=("k_proj",)),
                       rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing .*k_proj\.lora_A"):
        load_adapters(other, str(tmp_path))


def test_export_requires_merge(adapted, tmp_path):
    model, _ = adapted
    with pytest.raises(ValueError, match="unmerged LoRA"):
        save_hf(model, str(tmp_path))
    merge_lora(model)
    save_hf(model, str(tmp_path))  # merged weights export as a plain checkpoint
    assert not any("lora" in n for n in load_file(str(tmp_path / "model.safetensors")))
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_adapters(model, CFG, str(tmp_path / "adapters"))


@pytest.mark.parametrize("kwargs, message", [({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"),
                                             ({"targets": ("qkv",)}, "targets"),
                                             ({"targets": "q_proj"}, "targets")])
def test_bad_lora_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_apply_twice_raises(adapted):
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(adapted[0], CFG, rngs=nnx.Rngs(0))
