"""``ModelConfig.mlp_chunk``: each layer's MLP block in token slices, each under the layer's remat policy.

Same loss and gradients as the unsliced layer; under ``remat="full"`` the compiled backward holds one slice's
``[B, c, F]`` arrays (its temporary memory drops) while running the same matmuls (as many ``dot`` ops in the
optimized program, only over slices); refused with the policies that keep the MLP's intermediates.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.models import Llama, preset
from selmerge_jax.models.memory import train_memory
from selmerge_jax.training.train_step import HiddenStates, chunked_cross_entropy

T = 1024
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, T)), jnp.int32)


def _grad_fn(remat: str, chunk: int | None):
    """The jitted gradient of the chunked loss of a 2-layer model whose MLP is wide (F = 4096 >> D = 32), and
    its state."""
    cfg = preset("tiny", vocab_size=64, d_model=32, ffn_dim=4096, num_layers=2, remat=remat, mlp_chunk=chunk)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    targets, mask = jnp.roll(TOKENS, -1, axis=1), jnp.ones(TOKENS.shape, jnp.float32)

    def loss(state):
        m = nnx.merge(graphdef, state)
        return chunked_cross_entropy(HiddenStates(m.hidden_states(TOKENS)[0], m.output_logits), targets, mask,
                                     256)[0]

    return jax.jit(jax.value_and_grad(loss)), state


@pytest.mark.parametrize("remat", ["full", "none"])
@pytest.mark.parametrize("chunk", [128, 100])  # dividing T, and with a tail slice
def test_sliced_mlp_gives_the_unsliced_loss_and_gradients(remat, chunk):
    fn, state = _grad_fn(remat, None)
    want_loss, want = fn(state)
    fn, state = _grad_fn(remat, chunk)
    loss, got = fn(state)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sliced_mlp_holds_one_slice_in_the_backward_with_the_same_matmuls():
    compiled = {}
    for chunk in (None, 128):
        fn, state = _grad_fn("full", chunk)
        compiled[chunk] = fn.lower(state).compile()
    temp = {c: x.memory_analysis().temp_size_in_bytes for c, x in compiled.items()}
    assert temp[128] < 0.5 * temp[None], temp  # measured on CPU: 180 MB -> 71 MB
    dots = {c: re.findall(r"\[([0-9,]*)\]\{[^}]*\} dot\(", x.as_text()) for c, x in compiled.items()}
    assert len(dots[128]) == len(dots[None])  # nothing runs twice; the F-wide ones over slices:
    assert sorted(d for d in dots[None] if d == f"{T},4096") == [f"{T},4096"] * 5
    assert sorted(d for d in dots[128] if d == "128,4096") == ["128,4096"] * 5


@pytest.mark.parametrize("remat", ["save", "dots", "dots_no_batch"])
def test_mlp_chunk_is_refused_where_the_policy_keeps_the_mlp_intermediates(remat):
    with pytest.raises(ValueError, match=rf"mlp_chunk=4096 needs remat in .*got remat='{remat}'"):
        preset("tiny", remat=remat, mlp_chunk=4096)
    with pytest.raises(ValueError, match=r"mlp_chunk"):
        preset("tiny", remat="full", mlp_chunk=0)


@pytest.mark.parametrize("attention", ["ring", "ring_ms"])
def test_mlp_chunk_is_refused_with_a_sharded_sequence(attention):
    with pytest.raises(ValueError, match=rf"mlp_chunk=4096 with attention='{attention}': the sequence axis"):
        preset("tiny", remat="full", mlp_chunk=4096, attention=attention)


def test_the_memory_planner_counts_one_slice_of_the_mlp():
    cfg = preset("llama2-7b", dtype="bfloat16", param_dtype="bfloat16", remat="full")
    whole = train_memory(cfg, batch=1, seq_len=131072)
    sliced = train_memory(cfg.replace(mlp_chunk=16384), batch=1, seq_len=131072)
    saved_f = 4 * (131072 - 16384) * cfg.ffn_dim * 2  # four [T, F] bf16 arrays less one slice's
    assert whole.transient - sliced.transient == saved_f
    assert sliced.total < 60 * 2**30 < whole.total
