"""Optimizer schedules, the jitted train step (accumulation, bf16, LoRA-only), metrics, mesh and the loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.data import TokenWindows
from selmerge_jax.sharding.mesh import MeshConfig, make_mesh, param_sharding, shard_batch, shard_params
from selmerge_jax.training import (
    CheckpointConfig,
    MetricsWriter,
    OptimizerConfig,
    TrainConfig,
    build_optimizer,
    init_train_state,
    learning_rate_schedule,
    make_eval_step,
    make_train_step,
    read_jsonl,
    train,
)
from selmerge_jax.training.optimizer import decay_mask
from selmerge_jax.training.train_step import split_batch, token_cross_entropy

V = 16


class Tiny(nnx.Module):
    """Embedding -> (LoRA) linear -> logits: enough structure for the step's plumbing, fast to compile."""

    def __init__(self, *, lora_rank: int | None = None, seed: int = 0, d: int = 8):
        rngs = nnx.Rngs(seed)
        self.emb = nnx.Embed(V, d, rngs=rngs)
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.out = (nnx.LoRALinear(d, V, lora_rank=lora_rank, rngs=rngs) if lora_rank
                    else nnx.Linear(d, V, rngs=rngs))

    def __call__(self, x, positions=None, segment_ids=None):
        return self.out(self.norm(self.emb(x)))


class TinyHidden(Tiny):
    """``Tiny`` returning ``HiddenStates`` to the step: its loss goes through ``chunked_cross_entropy``."""

    def hidden_states(self, x, positions=None, segment_ids=None):
        return self.norm(self.emb(x)), None

    def output_logits(self, h):
        return self.out(h).astype(jnp.float32)


def _batch(seed=0, b=4, t=8):
    return {"tokens": jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t + 1)), jnp.int32)}


def _run_steps(model, n, *, accumulation_steps=1, compute_dtype=jnp.float32, trainable="all", lr=1e-2):
    tx, schedule = build_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=0), 10)
    graphdef, state = init_train_state(model, tx, trainable=trainable)
    step = make_train_step(graphdef, tx, schedule=schedule, accumulation_steps=accumulation_steps,
                           compute_dtype=compute_dtype, donate=False)
    losses = []
    for i in range(n):
        state, metrics = step(state, _batch(i))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_schedule_warmup_then_cosine_to_floor():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    sched = learning_rate_schedule(cfg, 110)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.55, abs=1e-6)  # half way down the cosine: (1 + 0.1) / 2
    assert float(sched(110)) == pytest.approx(0.1)
    const = learning_rate_schedule(OptimizerConfig(learning_rate=0.5, schedule="constant", warmup_steps=0), 5)
    assert float(const(0)) == float(const(1000)) == 0.5


def test_decay_mask_exempts_vectors():
    mask = decay_mask({"w": jnp.ones((2, 3)), "b": jnp.ones(3), "s": jnp.ones(())})
    assert mask == {"w": True, "b": False, "s": False}


@pytest.mark.parametrize("bad", [{"learning_rate": 0.0}, {"schedule": "linear"}, {"accumulation_steps": 0},
                                 {"clip_norm": -1.0}, {"b2": 1.5}])
def test_optimizer_config_rejects(bad):
    with pytest.raises(ValueError, match="OptimizerConfig." + next(iter(bad))):
        OptimizerConfig(**bad)


def test_loss_falls_and_step_compiles_once():
    traces = []

    def forward(model, inputs, ctx):
        traces.append(1)  # runs only while tracing
        return model(inputs["tokens"])

    tx, _ = build_optimizer(OptimizerConfig(learning_rate=3e-2, warmup_steps=0), 50)
    graphdef, state = init_train_state(Tiny(), tx)
    step = make_train_step(graphdef, tx, forward=forward)
    batch = _batch(0)
    first = None
    for _ in range(30):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert len(traces) == 1
    assert int(state.step) == 30
    assert float(metrics["loss"]) < first - 0.5


@pytest.mark.parametrize("trainable", ["all", "lora"])  # the head trained, or only its adapter
def test_the_chunked_loss_in_a_train_step_equals_the_logits_path(trainable):
    """Through ``make_train_step`` with gradient accumulation and bf16 compute: the custom-VJP chunked loss
    (``loss_chunk`` 3 of 8 tokens: ragged) moves the parameters as the full-logits loss does."""
    def run(model):
        tx, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10)
        graphdef, state = init_train_state(model, tx, trainable=trainable)
        step = make_train_step(graphdef, tx, accumulation_steps=2, compute_dtype=jnp.bfloat16, loss_chunk=3,
                               donate=False)
        seen = []
        for i in range(2):
            state, metrics = step(state, _batch(i))
            seen.append((float(metrics["loss"]), float(metrics["grad_norm"])))  # Adam hides a grad's scale
        return state, seen

    (chunked, l_c), (full, l_f) = run(TinyHidden(lora_rank=4)), run(Tiny(lora_rank=4))
    np.testing.assert_allclose(l_c, l_f, rtol=1e-2)
    for a, b in zip(jax.tree.leaves(chunked.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-4)


def test_grad_accumulation_matches_one_big_batch():
    _, one = _run_steps(Tiny(), 3, accumulation_steps=1)
    _, acc = _run_steps(Tiny(), 3, accumulation_steps=4)
    np.testing.assert_allclose(acc, one, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_master_params():
    state, bf = _run_steps(Tiny(), 3, compute_dtype=jnp.bfloat16)
    _, fp = _run_steps(Tiny(), 3)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(bf, fp, rtol=3e-2)


def test_lora_only_updates_adapters():
    model = Tiny(lora_rank=2)
    base_before = np.asarray(model.out.kernel[...])
    state, _ = _run_steps(model, 2, trainable="lora")
    trained = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert trained and all("lora" in p for p in trained)
    np.testing.assert_array_equal(np.asarray(state.rest["out"]["kernel"][...]), base_before)
    with pytest.raises(ValueError, match="trainable='lora' selects no parameters"):
        _run_steps(Tiny(), 1, trainable="lora")


def test_split_batch_forms_and_errors():
    inputs, targets, mask = split_batch(_batch(0, b=2, t=5))
    assert inputs["tokens"].shape == targets.shape == mask.shape == (2, 5) and set(inputs) == {"tokens"}
    pos = jnp.zeros((2, 5), jnp.int32)
    inputs, _, _ = split_batch({"inputs": pos, "targets": pos, "positions": pos, "segment_ids": None})
    assert set(inputs) == {"tokens", "positions"}
    with pytest.raises(ValueError, match="needs 'tokens' or 'inputs'"):
        split_batch({"x": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="batch\\['loss_mask'\\]"):
        split_batch({"tokens": jnp.zeros((2, 4), jnp.int32), "mask": jnp.ones((2, 4))})


def test_masked_targets_do_not_count():
    tx, _ = build_optimizer(OptimizerConfig(warmup_steps=0), 10)
    graphdef, state = init_train_state(Tiny(), tx)
    ev = make_eval_step(graphdef)
    batch = _batch(1)
    mask = np.ones((4, 8), np.float32)
    mask[:, 4:] = 0
    s_half, c_half = ev(state, {**batch, "loss_mask": jnp.asarray(mask)})
    s_cut, c_cut = ev(state, {"tokens": batch["tokens"][:, :5]})
    assert float(c_half) == float(c_cut) == 16
    np.testing.assert_allclose(float(s_half), float(s_cut), rtol=1e-6)


def test_token_cross_entropy_equals_optax_and_refuses_out_of_range_targets():
    """The iota-compare pick (an elementwise gradient, no scatter) gives optax's losses and gradients; a
    counted target outside [0, V) is a NaN loss, never a wrapped index's finite one; a masked one counts
    nothing."""
    import optax

    logits = 3 * jax.random.normal(jax.random.key(0), (2, 7, V))
    targets = jax.random.randint(jax.random.key(1), (2, 7), 0, V)
    mask = (jax.random.uniform(jax.random.key(2), (2, 7)) > 0.3).astype(jnp.float32)

    def ours(lg):
        return token_cross_entropy(lg, targets, mask)[0]

    def theirs(lg):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(lg, targets) * mask)

    np.testing.assert_allclose(float(ours(logits)), float(theirs(logits)), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(theirs)(logits), atol=1e-6)
    for bad in (V, -1):
        total, _ = token_cross_entropy(logits, targets.at[0, 0].set(bad), jnp.ones_like(mask))
        assert np.isnan(float(total)), bad
    ignored = token_cross_entropy(logits, targets.at[0, 0].set(-100), mask.at[0, 0].set(0.0))[0]
    kept = token_cross_entropy(logits, targets, mask.at[0, 0].set(0.0))[0]
    np.testing.assert_allclose(float(ignored), float(kept))
    half = token_cross_entropy(logits.astype(jnp.bfloat16), targets, mask)[0]
    full = theirs(logits.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(float(half), float(full), rtol=1e-6)
    with pytest.raises(TypeError, match="targets"):
        token_cross_entropy(logits, targets.astype(jnp.float32), mask)


def test_mesh_config_and_param_sharding():
    assert MeshConfig(data=-1, fsdp=2, seq=2).shape(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="!= device count"):
        MeshConfig(data=3, fsdp=1).shape(8)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    spec = lambda shape, **kw: param_sharding(shape, mesh, **kw).spec
    assert spec((1000, 6), min_size=0) == jax.sharding.PartitionSpec("fsdp", None)
    assert spec((6, 1024), min_size=0) == jax.sharding.PartitionSpec(None, "fsdp")  # largest divisible dim
    assert spec((6, 10), min_size=0) == jax.sharding.PartitionSpec()  # nothing divides by 4
    assert spec((1000, 6)) == jax.sharding.PartitionSpec()  # small: replicated


def test_sharded_step_matches_single_device():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, seq=2))
    tx, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10)
    graphdef, state = init_train_state(Tiny(), tx)
    step = make_train_step(graphdef, tx, donate=False)
    ref_state, ref = step(state, _batch(3))
    sharded = shard_params(state, mesh, min_size=0)
    new_state, out = step(sharded, shard_batch(jax.device_get(_batch(3)), mesh))
    np.testing.assert_allclose(float(out["loss"]), float(ref["loss"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state.params["out"]["kernel"][...]),
                               np.asarray(ref_state.params["out"]["kernel"][...]), rtol=1e-4, atol=1e-6)


def test_metrics_jsonl_tensorboard_and_last_line_wins(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 2.0})
        w.write(2, {"loss": float("nan")})
        w.write(1, {"loss": 1.5})  # a resumed run rewrote step 1
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[1]["loss"] == 1.5 and records[2]["loss"] == "nan"
    assert os.listdir(tmp_path / "tensorboard")


def test_train_loop_logs_evaluates_and_checkpoints(tmp_path):
    tokens = np.tile(np.arange(V), 400)  # a learnable cycle: next token = current + 1
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=8, log_every=4, eval_every=6, eval_batches=2,
                      output_dir=str(tmp_path), progress=False)
    windows = {"batch_size": 4, "seq_len": 8, "bos_id": V}
    result = train(Tiny(), TokenWindows(tokens, **windows), train=cfg,
                   optimizer=OptimizerConfig(learning_rate=5e-2, warmup_steps=2),
                   checkpoint=CheckpointConfig(every_steps=6, async_save=False),
                   eval_batches=lambda: TokenWindows(tokens, shuffle=False, num_epochs=1, **windows),
                   meta={"note": "x"})
    assert [h["step"] for h in result.history] == [4, 8, 12]
    assert [e["step"] for e in result.evals] == [6, 12]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [6, 12]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in x for x in lines) and all("step" in x for x in lines)
