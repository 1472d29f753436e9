"""The tiny Llama trains with attention="ring" / "ring_ms" over a sequence axis of 4 with the same losses."""

import jax
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.models.config import preset
from selmerge_jax.models.llama import Llama
from selmerge_jax.sharding.mesh import MeshConfig, make_mesh, shard_batch
from selmerge_jax.training import OptimizerConfig, build_optimizer, init_train_state, make_train_step

V, T, STEPS = 64, 32, 3
MS = MSAttentionConfig(selection_source="group", block_size=4, top_k=3, selection_heads="kv")


def losses(attention: str, mesh=None) -> list[float]:
    config = preset("tiny", vocab_size=V, d_model=32, ffn_dim=48, num_layers=2, attention=attention, ms=MS)
    tx, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), STEPS)
    graphdef, state = init_train_state(Llama(config, rngs=nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, tx, donate=False)
    batch = {"tokens": np.random.default_rng(0).integers(0, V, (2, T + 1)).astype(np.int32)}
    if mesh is not None:
        batch = shard_batch(batch, mesh)
    out = []
    for _ in range(STEPS):  # the same batch every step: the loss must fall
        state, metrics = step(state, batch)
        out.append(float(metrics["loss"]))
    return out


@pytest.mark.parametrize(("ring", "single"), [
    ("ring", "dense"),
    pytest.param("ring_ms", "ms", marks=pytest.mark.slow),  # ~30 s more of compiles on one core
])
def test_tiny_model_trains_with_a_sequence_axis_of_four(ring, single):
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, seq=4))
    with jax.set_mesh(mesh):
        sharded = losses(ring, mesh)
    np.testing.assert_allclose(sharded, losses(single), rtol=2e-5)
    assert sharded[-1] < sharded[0]


def test_ring_attention_outside_a_mesh_says_how_to_fix_it():
    config = preset("tiny", vocab_size=V, d_model=32, ffn_dim=48, num_layers=1, attention="ring")
    model = Llama(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"jax\.set_mesh"):
        model(np.zeros((1, 8), np.int32))


@pytest.mark.slow
def test_train_loop_runs_a_ring_model_on_a_mesh_with_a_sequence_axis(tmp_path):
    """``training.train`` with a (data=2, seq=4) mesh: the loop sets the ambient mesh that ring attention
    needs."""
    from selmerge_jax.data import TokenWindows
    from selmerge_jax.training import CheckpointConfig, TrainConfig, train

    config = preset("tiny", vocab_size=V, d_model=32, ffn_dim=48, num_layers=1, attention="ring")
    tokens = np.tile(np.arange(V - 1), 50)
    result = train(Llama(config, rngs=nnx.Rngs(0)),
                   TokenWindows(tokens, batch_size=2, seq_len=T, bos_id=V - 1),
                   train=TrainConfig(steps=4, batch_size=2, seq_len=T, log_every=2, output_dir=str(tmp_path),
                                     progress=False),
                   optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
                   checkpoint=CheckpointConfig(every_steps=0, async_save=False),
                   mesh=make_mesh(MeshConfig(data=2, fsdp=1, seq=4)),
                   batch_transform=lambda batch, step: {k: v for k, v in batch.items() if k != "segment_ids"})
    assert [h["step"] for h in result.history] == [2, 4]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
