"""``ModelConfig.fuse_projections``: q/k/v as one matmul and gate/up as one (``llama.project_together``).

Same parameters (paths and shapes), same logits, loss and gradients as the unfused model, with LoRA adapters
on fused projections (and once merged) and with biases; the compiled step runs fewer, wider matmuls, and
under ``remat="save"`` still recomputes none.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.models import Llama, lora, preset
from selmerge_jax.models.memory import train_memory
from selmerge_jax.training.train_step import HiddenStates, chunked_cross_entropy

T = 256
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, T)), jnp.int32)
TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj")


def _model(fuse: bool, remat: str = "none", merged: bool = False, **overrides) -> Llama:
    cfg = preset("tiny", attention="ms", remat=remat, fuse_projections=fuse, **overrides)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoRAConfig(rank=4, targets=TARGETS), rngs=nnx.Rngs(1))
    for i, (_, node) in enumerate(lora._lora_modules(model)):  # nonzero B: the adapters change the output
        node.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), node.lora_b.shape)
    return lora.merge_lora(model) if merged else model


def _jitted_loss_and_grads(model: Llama):
    graphdef, state = nnx.split(model)
    targets, mask = jnp.roll(TOKENS, -1, axis=1), jnp.ones(TOKENS.shape, jnp.float32)

    def loss(state):
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(TOKENS)[0]
        return chunked_cross_entropy(HiddenStates(h, m.output_logits), targets, mask, 128)[0]

    return jax.jit(jax.value_and_grad(loss)), state


def _loss_and_grads(model: Llama):
    fn, state = _jitted_loss_and_grads(model)
    return fn(state)


def test_fused_model_has_the_unfused_parameters():
    paths = lambda m: {p: v.shape for p, v in nnx.to_flat_state(nnx.state(m))}
    assert paths(_model(True)) == paths(_model(False))


@pytest.mark.parametrize(("remat", "bias"), [("none", False), ("save", True), ("full", False)])
def test_fused_projections_give_the_unfused_loss_and_gradients(remat, bias):
    want_loss, want = _loss_and_grads(_model(False, remat, attention_bias=bias))
    got_loss, got = _loss_and_grads(_model(True, remat, attention_bias=bias))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want), strict=True):
        # f32 sums in another order: measured differences up to 5e-5 of the array's largest entry
        scale = float(jnp.abs(b[...]).max())
        np.testing.assert_allclose(a[...], b[...], rtol=0, atol=2e-4 * scale, err_msg=str(path))


def test_fused_projections_with_merged_adapters_give_the_unfused_logits():
    adapted = _model(True)(TOKENS)
    want, got = _model(False, merged=True)(TOKENS), _model(True, merged=True)(TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, adapted, rtol=1e-4, atol=1e-4)  # merged = adapters added per projection
    base = Llama(preset("tiny", attention="ms", fuse_projections=True), rngs=nnx.Rngs(0))(TOKENS)
    assert not np.allclose(adapted, base, atol=1e-3)  # and the adapters do change the output


def _dots(fuse: bool, remat: str) -> list[str]:
    fn, state = _jitted_loss_and_grads(_model(fuse, remat))
    return re.findall(r"\[([0-9,]*)\]\{[^}]*\} dot\(", fn.lower(state).compile().as_text())


def test_fused_step_runs_fewer_wider_matmuls_and_save_recomputes_none():
    """Dots of the scanned layer's body (one layer) in the compiled step, which trains every parameter."""
    cfg = preset("tiny")
    tokens, qkv = TOKENS.size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_size
    big = lambda dots: sorted(s for s in dots if s.startswith(f"{tokens},") and s != f"{tokens},4")
    unfused, fused, fused_none = _dots(False, "save"), _dots(True, "save"), _dots(True, "none")
    # "save" recomputes the rank-4 LoRA products and selection's scores, never a projection
    assert big(fused) == big(fused_none)
    # q,k,v -> one and gate,up -> one, in the forward, the dX of the backward and the dW: 3 x (2 + 1) fewer
    assert len(unfused) - len(fused) == 9, (len(unfused), len(fused))
    assert f"{tokens},{qkv}" in fused and f"{tokens},{2 * cfg.ffn_dim}" in fused


def test_fuse_projections_must_be_a_bool():
    with pytest.raises(ValueError, match=r"ModelConfig.fuse_projections=1: must be a bool"):
        preset("tiny", fuse_projections=1)


def test_planner_counts_the_fused_qkv_output():
    """A deviceless gpu_plan.py compile of the 7B step at 128K ("full", 16K MLP slices) for an H200 grew 56.9
    -> 59.99 GiB when fused: the planner adds that [T, (N + 2K) H] buffer under recompute, so its estimate
    stays above that plan; under "save" the plan did not grow and nothing is added."""
    cfg = preset("llama2-7b", dtype="bfloat16", param_dtype="bfloat16", remat="full", mlp_chunk=16384,
                 max_seq_len=131072)
    plain = train_memory(cfg, batch=1, seq_len=131072, lora_rank=16).total
    fused = train_memory(cfg.replace(fuse_projections=True), batch=1, seq_len=131072, lora_rank=16).total
    assert fused - plain == 131072 * 3 * 4096 * 2
    assert fused > 59.99 * 2**30  # gpu_plan.py reports GiB
    save = cfg.replace(remat="save", mlp_chunk=None)
    assert train_memory(save.replace(fuse_projections=True), batch=1, seq_len=131072, lora_rank=16).total == \
        train_memory(save, batch=1, seq_len=131072, lora_rank=16).total


def test_cached_forward_runs_unfused_and_agrees():
    """Prefill and decode through the KV cache run unfused (a decode loop would otherwise hold or re-copy
    every layer's concatenated kernels): a fused model's logits there equal the unfused model's exactly."""
    from selmerge_jax.models.generate import generate
    got, want = (generate(_model(f), TOKENS[:1, :32], max_new_tokens=4, return_logits=True).logits
                 for f in (True, False))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_project_together_refuses_projections_of_other_widths():
    from selmerge_jax.models.llama import project_together
    layer = _model(True).layers.self_attn
    x = jnp.ones((1, 4, preset("tiny").d_model))
    with pytest.raises(ValueError, match=r"projections='2 with input widths \[64, 128\]'"):
        project_together(x, [layer.q_proj, layer.o_proj.__class__(128, 8, rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match=r"projections='0 with input widths \[\]'"):
        project_together(x, [])
