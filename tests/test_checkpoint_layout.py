"""A checkpoint of the model's earlier per-layer layout restores into today's stacked (scanned) layers.

``tests/fixtures/looped_checkpoint`` was written by the looped model (commit a9e9a33): a 3-layer Llama with
LoRA adapters on q/v and AdamW state after two steps, with the logits the trained model gave on
``tokens.npy``.
"""

import pathlib
import shutil

import jax
import numpy as np
import optax
from flax import nnx

from selmerge_jax.models import Llama, preset
from selmerge_jax.models.lora import LoRAConfig, apply_lora
from selmerge_jax.training.checkpoint import Checkpointer, stack_layer_entries
from selmerge_jax.training.train_step import init_train_state, make_train_step

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "looped_checkpoint"


def _target():
    model = Llama(preset("tiny", vocab_size=64, d_model=32, ffn_dim=48, num_layers=3), rngs=nnx.Rngs(5))
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(6))
    tx = optax.adamw(1e-2)
    graphdef, state = init_train_state(model, tx, trainable="lora")
    return graphdef, state, tx


def test_looped_checkpoint_restores_into_stacked_layers(tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(FIXTURE / "checkpoints", directory)
    graphdef, target, tx = _target()
    with Checkpointer(directory, async_save=False) as ck:
        state, _, meta = ck.restore(target)
    assert meta == {"note": "looped layout fixture"} and int(state.step) == 2
    tokens = np.load(FIXTURE / "tokens.npy")
    logits = nnx.merge(graphdef, state.params, state.rest)(tokens[:, :-1])
    np.testing.assert_allclose(logits, np.load(FIXTURE / "logits.npy"), rtol=1e-5, atol=1e-5)
    # The optimizer moments came along too: training continues from them.
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(target.opt_state)
    state, metrics = make_train_step(graphdef, tx, donate=False)(state, {"tokens": tokens})
    assert np.isfinite(float(metrics["loss"]))


def test_stack_layer_entries_leaves_other_trees_alone():
    tree = {"params": {"embed": np.zeros(3), "layers": {"w": np.zeros((2, 3))}}}
    assert stack_layer_entries(tree) is tree
    stacked = stack_layer_entries({"layers": {"0": {"w": np.ones(2)}, "1": {"w": np.zeros(2)}}})
    np.testing.assert_array_equal(stacked["layers"]["w"], [[1, 1], [0, 0]])
