"""``ModelConfig.mlp_chunk``: each layer's MLP block in token slices, each under the layer's remat policy.

Same loss and gradients as the unsliced layer (batch > 1 and packed documents included); under
``remat="full"`` the compiled backward holds one slice's ``[B, c, F]`` arrays (its temporary memory drops)
while running the same matmuls (as many ``dot`` ops in the optimized program, only over slices), and under
``"save"`` too; refused without remat, with a sharded sequence (ring attention, a seq mesh axis in training).
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


def _grad_fn(remat: str, chunk: int | None, batch: int = 1):
    """The jitted gradient of the chunked loss of a 2-layer model whose MLP is wide (F = 4096 >> D = 32), and
    its state. ``batch`` 2: two sequences, the second of two packed documents with restarting positions."""
    cfg = preset("tiny", vocab_size=64, d_model=32, ffn_dim=4096, num_layers=2, remat=remat, mlp_chunk=chunk)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.concatenate([TOKENS, jnp.flip(TOKENS, 1)])[:batch]
    seg = jnp.asarray([[0] * T, [0] * 300 + [1] * (T - 300)][:batch], jnp.int32)
    pos = jnp.asarray([list(range(T)), list(range(300)) + list(range(T - 300))][:batch], jnp.int32)
    targets, mask = jnp.roll(tokens, -1, axis=1), jnp.ones(tokens.shape, jnp.float32)

    def loss(state):
        m = nnx.merge(graphdef, state)
        packed = {"positions": pos, "segment_ids": seg} if batch > 1 else {}
        h = m.hidden_states(tokens, **packed)[0]
        return chunked_cross_entropy(HiddenStates(h, m.output_logits), targets, mask, 256)[0]

    return jax.jit(jax.value_and_grad(loss)), state


@pytest.mark.parametrize(("remat", "chunk", "batch"), [
    ("full", 128, 1), ("full", 100, 1),  # dividing T, and with a tail slice
    ("offload", 128, 1), ("save", 100, 1), ("full", 100, 2),  # the other policies; packed, batch > 1
])
def test_sliced_mlp_gives_the_unsliced_loss_and_gradients(remat, chunk, batch):
    fn, state = _grad_fn(remat, None, batch)
    want_loss, want = fn(state)
    fn, state = _grad_fn(remat, chunk, batch)
    loss, got = fn(state)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _compiled(remat: str, chunk: int | None):
    fn, state = _grad_fn(remat, chunk)
    compiled = fn.lower(state).compile()
    dots = re.findall(r"\[([0-9,]*)\]\{[^}]*\} dot\(", compiled.as_text())
    return compiled.memory_analysis().temp_size_in_bytes, dots


def test_sliced_mlp_holds_one_slice_in_the_backward_with_the_same_matmuls():
    (whole, dots_whole), (sliced, dots_sliced) = _compiled("full", None), _compiled("full", 128)
    assert sliced < 0.5 * whole, (whole, sliced)  # measured on CPU: 180 MB -> 71 MB
    assert len(dots_sliced) == len(dots_whole)  # nothing runs twice; the F-wide ones over slices:
    assert dots_whole.count(f"{T},4096") == dots_sliced.count("128,4096") == 5


def test_under_save_slices_run_the_same_matmuls():
    """The layer's policy applies inside the slices' loop: "save" keeps gate/up there and recomputes none."""
    (_, dots_whole), (_, dots_sliced) = _compiled("save", None), _compiled("save", 128)
    assert len(dots_sliced) == len(dots_whole)
    assert dots_whole.count(f"{T},4096") == dots_sliced.count("128,4096") == 3


def test_mlp_chunk_is_refused_without_remat():
    with pytest.raises(ValueError, match=r"mlp_chunk=4096 needs remat in .*got remat='none': without remat"):
        preset("tiny", remat="none", mlp_chunk=4096)
    with pytest.raises(ValueError, match=r"mlp_chunk"):
        preset("tiny", remat="full", mlp_chunk=0)


def test_training_refuses_mlp_chunk_on_a_mesh_that_shards_the_sequence():
    from types import SimpleNamespace

    from selmerge_jax.training import TrainConfig, loop

    model = SimpleNamespace(config=preset("tiny", remat="full", mlp_chunk=256))
    mesh = SimpleNamespace(shape={"data": 1, "seq": 2})
    with pytest.raises(ValueError, match=r"model.config.mlp_chunk=256: must be None on a mesh whose seq"):
        loop._check_layout(TrainConfig(seq_len=1024, batch_size=1), mesh, model)


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


def test_residual_sliced_refuses_bad_input():
    from selmerge_jax.models.llama import residual_sliced

    with pytest.raises(ValueError, match=r"chunk=0"):
        residual_sliced(lambda y: y, jnp.zeros((1, 8, 4)), 0, None)
    with pytest.raises(ValueError, match=r"x must be \[B, T, D\], got shape \(8, 4\)"):
        residual_sliced(lambda y: y, jnp.zeros((8, 4)), 2, None)
