"""The training loop: resume, step, log, evaluate, checkpoint; everything else is in the pure step functions.

``train`` owns the side effects and nothing else: it builds the optimizer and the ``(graphdef, TrainState)``,
restores the newest checkpoint (state *and* data-iterator position) when there is one, then runs optimizer
steps until ``train.steps``. Metrics sync with the device only every ``log_every`` steps (and before each
checkpoint), so the host keeps queueing work.

What it refuses or reports, as a one-line :class:`~selmerge_jax.validation.UserError`: a fresh run
(``checkpoint.resume=false``) into a directory that holds another run's checkpoints; a resume whose config
differs in a field nobody allowed (``checkpoint.allow_changes``; accepted differences are logged); a loss or
gradient that is not finite (:class:`DivergenceError`: the run stops before anything of that step is saved).
An unreadable newest checkpoint is set aside and the run resumes from the previous good one, saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from selmerge_jax.layers.attention import describe
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.memory import check_fits
from selmerge_jax.sharding import distributed
from selmerge_jax.sharding.distributed import allgather_json
from selmerge_jax.sharding.mesh import data_shard, shard_batch, shard_params
from selmerge_jax.training.checkpoint import (
    RESUMABLE_CHANGES,
    Checkpointer,
    CheckpointError,
    allowed_change,
    config_differences,
)
from selmerge_jax.training.config import CheckpointConfig, OptimizerConfig, TrainConfig
from selmerge_jax.training.metrics import MetricsWriter, Progress
from selmerge_jax.training.optimizer import build_optimizer
from selmerge_jax.training.train_step import (
    TrainState,
    default_forward,
    init_train_state,
    make_eval_step,
    make_train_step,
)
from selmerge_jax.validation import UserError, fail

__all__ = ["DivergenceError", "TrainResult", "evaluate", "peak_memory_bytes", "train"]

_log = logging.getLogger(__name__)
BatchTransform = Callable[[dict, int], dict]


class DivergenceError(UserError):
    """The loss or the gradient norm of a step is NaN or infinite; the message names the step and the last
    good checkpoint (nothing of the diverged step is saved)."""


@dataclasses.dataclass
class TrainResult:
    graphdef: object
    state: TrainState
    history: list[dict]  # the logged train lines, in order
    evals: list[dict]  # validation lines ({"step", "val_loss", ...})
    resumed_from: int | None  # the checkpoint step this run started from, if any


def peak_memory_bytes() -> int | None:
    """Peak bytes allocated on device 0 (GPU/TPU); None on backends without memory stats (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _place(batch: dict, mesh) -> dict:
    if mesh is not None:
        return shard_batch(batch, mesh)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def evaluate(eval_step, state: TrainState, batches: Iterable[dict], num_batches: int, mesh=None) -> dict:
    """Token-weighted mean loss over up to ``num_batches`` batches: ``{"val_loss", "val_tokens"}``."""
    loss_sum, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        s, c = jax.device_get(eval_step(state, _place(batch, mesh)))
        loss_sum, count = loss_sum + float(s), count + float(c)
    if count == 0:
        raise ValueError("evaluation saw no tokens: the validation source yielded no batches")
    return {"val_loss": loss_sum / count, "val_tokens": count}


def _init(model, train_cfg: TrainConfig, opt_cfg: OptimizerConfig, mesh, trainable):
    tx, schedule = build_optimizer(opt_cfg, train_cfg.steps)
    trainable = train_cfg.trainable if trainable is None else trainable
    graphdef, state = init_train_state(model, tx, trainable=trainable, seed=train_cfg.seed)
    if mesh is not None:
        state = shard_params(state, mesh)
    return tx, schedule, graphdef, state


def _resume(ckpt: Checkpointer, state: TrainState, batches, meta: dict | None,
            shard: tuple[int, int], allow: tuple[str, ...] = ()) -> tuple[TrainState, int | None]:
    """Restores the newest readable checkpoint; unreadable newer steps (a truncated or corrupted file) are set
    aside with a warning, so the run continues from the previous good step."""
    steps, bad = ckpt.all_steps(), []
    for step in reversed(steps):
        try:
            accepted = _check_same_run(ckpt, step, meta, allow)
            restored, data_state, _ = ckpt.restore(state, step)
        except CheckpointError as error:
            bad.append((step, error))
            continue
        for key, (old, new) in accepted.items():
            if key != "checkpoint.allow_changes":  # the permission itself is no change of the run
                _log.warning("resume from step %d: accepting the change of %s: %r -> %r", step, key, old, new)
        for bad_step, error in bad:
            where = ckpt.set_aside(bad_step)
            _log.warning("%s; moved it to %s and resuming from the previous good step %d", error, where, step)
        _restore_data(batches, data_state, step, shard)
        _log.info("resumed from %s step %d", ckpt.directory, step)
        return restored, step
    if bad:
        raise CheckpointError(f"no readable checkpoint in {ckpt.directory} (steps "
                              f"{', '.join(str(s) for s, _ in bad)}); the newest: {bad[0][1]}")
    return state, None


def _restore_data(batches, data_state, step: int, shard: tuple[int, int]) -> None:
    if data_state and hasattr(batches, "set_state"):
        batches.set_state(_my_data_state(data_state, shard, batches))
    elif hasattr(batches, "set_state"):
        _log.warning("checkpoint %d has no data-iterator state; data order restarts from the beginning", step)
    else:
        _log.warning("the batch iterator has no set_state(): a resumed run does not see the same data order")


def _data_states(batches, shard: tuple[int, int]) -> dict | None:
    """Every process's iterator position (each reads its own shard), gathered so that the checkpoint, which
    process 0 writes, holds them all: ``{"shard_count", "shard_index": [per process], "process_states"}``."""
    if not hasattr(batches, "get_state"):
        return None
    everyone = allgather_json({"shard_index": shard[0], "state": batches.get_state()})
    return {"shard_count": shard[1], "shard_index": [e["shard_index"] for e in everyone],
            "process_states": [e["state"] for e in everyone]}


def _my_data_state(stored: dict, shard: tuple[int, int], batches):
    """This process's position out of a checkpoint's data item. Under the same shard count, any process that
    read the same shard saved it; under another, only a pipeline whose position is global (``reshardable``:
    the corpus windows of ``data.TokenWindows``) carries over, and anything else is refused."""
    if "process_states" not in stored:  # written by one process before positions were gathered
        stored = {"shard_count": 1, "shard_index": [0], "process_states": [stored]}
    index, count = shard
    if stored["shard_count"] == count:
        return stored["process_states"][stored["shard_index"].index(index)]
    if getattr(batches, "reshardable", False):
        return stored["process_states"][0]
    raise ValueError(
        f"the checkpoint's data position was saved by {stored['shard_count']} data shards and this run reads "
        f"{count}: {type(batches).__name__} cannot carry a per-shard position over to another shard count "
        "(the grain document pipeline shards documents per process; passkey/copy rows are drawn per shard). "
        "Resume with the same processes x data/fsdp layout, or train from data.train_npy without "
        "passkey/copy rows, whose position is global.")


def _check_layout(train: TrainConfig, mesh, model=None) -> None:
    """The global batch and sequence split evenly over the mesh (nothing is floored); a model that slices its
    MLP over tokens (``ModelConfig.mlp_chunk``) only where the sequence is not sharded."""
    if mesh is None:
        return
    ring = mesh.shape.get("seq", 1)
    chunk = getattr(getattr(model, "config", None), "mlp_chunk", None)
    if chunk is not None and ring > 1:
        fail("model.config.mlp_chunk", chunk, f"None on a mesh whose seq axis ({ring}) shards the sequence: "
             "a loop over slices of a sharded axis moves them between devices")
    data_shard(mesh, train.batch_size)  # raises unless B divides over data*fsdp
    if train.seq_len % ring:
        fail("train.seq_len", train.seq_len, f"a multiple of the mesh's seq axis = {ring} (ring shards)")


def _check_same_run(ckpt: Checkpointer, step: int, meta: dict | None,
                    allow: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Refuses to resume a checkpoint written under another experiment config: it would silently continue (or,
    at its final step, silently report) a different run. Differences in bookkeeping fields
    (``RESUMABLE_CHANGES``) and in fields the user allowed are accepted and returned (the caller logs
    them)."""
    stored = ckpt.read_meta(step).get("config")
    current = (meta or {}).get("config")
    if stored is None or current is None:
        return {}
    diffs = config_differences(stored, current)
    refused = [k for k in diffs if not allowed_change(k, RESUMABLE_CHANGES) and not allowed_change(k, allow)]
    if refused:
        listed = "; ".join(f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in refused)
        raise UserError(f"{ckpt.directory} holds step {step} of a run with another config (changed: "
                        f"{', '.join(refused)}) [{listed}]; resuming would continue a different experiment. "
                        f"Allow the change explicitly (--allow-change {','.join(refused)}, i.e. "
                        "checkpoint.allow_changes), point train.output_dir elsewhere, or start over "
                        "(--overwrite).")
    return diffs


def _refuse_stale_checkpoints(ckpt: Checkpointer) -> None:
    """A fresh run (``resume=false``) must not write its steps between another run's (orbax would keep the
    old step of the same number, and metrics and plots would mix)."""
    steps = ckpt.all_steps()
    if steps:
        raise UserError(f"checkpoint.resume=false but {ckpt.directory} already holds checkpoints (steps "
                        f"{', '.join(map(str, steps))}) of an earlier run: write to a new train.output_dir, "
                        "or delete that run first (the CLI's --overwrite)")


class _Interval:
    """Accumulates device-side metrics between log points; one host sync per ``log_every`` steps."""

    def __init__(self):
        self.metrics, self.start = [], time.perf_counter()

    def check_finite(self, last_step: int, ckpt: Checkpointer, values=None) -> None:
        """Raises :class:`DivergenceError` at the first step of the interval (ending at ``last_step``) whose
        loss or gradient norm is not finite."""
        if values is None:
            values = jax.device_get([(m["loss"], m["grad_norm"]) for m in self.metrics])
        else:
            values = [(m["loss"], m["grad_norm"]) for m in values]
        first = last_step - len(values) + 1
        for i, (loss, grad_norm) in enumerate(values):
            if not (np.isfinite(loss) and np.isfinite(grad_norm)):
                good = [s for s in ckpt.all_steps() if s < first + i]
                kept = (f"the last good checkpoint is step {good[-1]} in {ckpt.directory}" if good
                        else f"no checkpoint was written yet ({ckpt.directory})")
                raise DivergenceError(f"training diverged at step {first + i}: loss={float(loss)}, "
                                      f"grad_norm={float(grad_norm)}; stopped, {kept} (lower "
                                      "optimizer.learning_rate, keep optimizer.clip_norm, or check the data)")

    def flush(self, last_step: int, ckpt: Checkpointer) -> dict:
        values = jax.device_get(self.metrics)
        self.check_finite(last_step, ckpt, values)
        now = time.perf_counter()
        elapsed, steps = now - self.start, len(values)
        tokens = sum(float(m["tokens"]) for m in values)
        out = {"loss": float(np.mean([m["loss"] for m in values])),
               "grad_norm": float(values[-1]["grad_norm"]),
               "tokens_per_s": tokens / elapsed, "step_time_s": elapsed / steps}
        if "learning_rate" in values[-1]:
            out["learning_rate"] = float(values[-1]["learning_rate"])
        self.metrics, self.start = [], now
        return out


def _check_memory(model, train: TrainConfig, optimizer: OptimizerConfig, state, mesh) -> None:
    """Refuses, before anything compiles, a step the memory planner says cannot fit the device; logs the
    attention in use and its attended fraction once (``layers.attention.describe``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        return
    if distributed.is_primary():
        print(describe(config.attention_spec, train.seq_len), flush=True)
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return  # CPU: no device memory to plan against
    devices = 1 if mesh is None else max(1, mesh.devices.size // mesh.shape.get("seq", 1))
    batch = max(1, train.batch_size // optimizer.accumulation_steps // devices)
    seq = train.seq_len if mesh is None else train.seq_len // mesh.shape.get("seq", 1)
    lora = train.trainable == "lora"
    check_fits(config.replace(dtype=train.compute_dtype), int(stats["bytes_limit"]), batch=batch, seq_len=seq,
               lora_rank=16 if lora else None,
               trainable_params=sum(int(x.size) for x in jax.tree.leaves(state.params)) if lora else None)


class _Eta:
    """After the first log intervals, one line with the run's size and a finish time: the first interval holds
    the compile, so the estimate uses the second one (or the first, when that is all there is)."""

    def __init__(self, start: int, train: TrainConfig):
        self.start, self.train, self.flushes = start, train, 0
        tokens = (train.steps - start) * train.batch_size * train.seq_len
        _log.info("training steps %d -> %d: %d x %d tokens a step, %s tokens in all", start, train.steps,
                  train.batch_size, train.seq_len, f"{tokens:,}")

    def update(self, step: int, line: dict) -> None:
        self.flushes += 1
        if self.flushes == 1:
            _log.info("step %d: the first %d steps took %.1f s (compile included)", step, step - self.start,
                      line["step_time_s"] * (step - self.start))
        if self.flushes == 2 or (self.flushes == 1 and step == self.train.steps):
            left = self.train.steps - step
            eta = datetime.timedelta(seconds=round(left * line["step_time_s"]))
            _log.info("step %d/%d: %.3g s/step, %s tokens/s; %d steps (%s tokens) left, ETA %s", step,
                      self.train.steps, line["step_time_s"], f"{line['tokens_per_s']:,.0f}", left,
                      f"{left * self.train.batch_size * self.train.seq_len:,}", eta)


def train(model, batches: Iterator[dict], *, train: TrainConfig, optimizer: OptimizerConfig,
          checkpoint: CheckpointConfig, eval_batches: Callable[[], Iterable[dict]] | None = None, mesh=None,
          forward=default_forward, batch_transform: BatchTransform | None = None,
          meta: dict | None = None, trainable=None, eval_forward=None,
          step_log: Callable[[int], dict] | None = None) -> TrainResult:
    """Trains ``model`` (an ``nnx.Module``) on ``batches`` to ``train.steps`` optimizer steps.

    Args:
      batches: iterator of batch dicts (see ``train_step.split_batch``); with ``get_state``/``set_state`` its
        position is checkpointed for exact resume.
      eval_batches: returns a fresh iterable of validation batches each time it is called.
      mesh: a ``("data", "fsdp", "seq")`` mesh (``selmerge_jax.sharding.mesh``); None = default device.
      forward: ``forward(model, {"tokens", ["positions"], ["segment_ids"]}, StepContext) -> logits``.
      batch_transform: ``(host_batch, step) -> host_batch`` before the step (e.g. CRD NTK positions); it must
      be
        a deterministic function of its arguments for resume to be exact.
      meta: JSON kept with every checkpoint (e.g. the experiment config).
      trainable: an NNX filter of the trained variables (default from ``train.trainable``).
      eval_forward: the forward of validation passes (default: ``forward``).
      step_log: ``step -> {name: value}`` added to every metrics line (e.g. the CRD NTK scale of that step).
    """
    _check_layout(train, mesh, model)
    shard = data_shard(mesh, train.batch_size)
    tx, schedule, graphdef, state = _init(model, train, optimizer, mesh, trainable)
    _check_memory(model, train, optimizer, state, mesh)
    ckpt_dir = checkpoint.directory or os.path.join(train.output_dir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=checkpoint.keep, async_save=checkpoint.async_save)
    resumed = None
    if checkpoint.resume:
        state, resumed = _resume(ckpt, state, batches, meta, shard, checkpoint.allow_changes)
    else:
        _refuse_stale_checkpoints(ckpt)
    step_fn = make_train_step(graphdef, tx, schedule=schedule,
                              accumulation_steps=optimizer.accumulation_steps,
                              compute_dtype=train.compute_dtype, forward=forward)
    eval_step = make_eval_step(graphdef, compute_dtype=train.compute_dtype, forward=eval_forward or forward)
    writer = MetricsWriter(train.output_dir, wandb=train.wandb, run_config=(meta or {}).get("config"))
    step = int(state.step)
    eta = _Eta(step, train)
    progress = Progress(step, train.steps, enabled=train.progress)
    history, evals = [], []
    context = contextlib.ExitStack()
    # attention="ring"/"ring_ms" find the mesh through jax.set_mesh (models take no mesh)
    if mesh is not None:
        context.enter_context(jax.set_mesh(mesh))
    try:
        interval = _Interval()
        while step < train.steps:
            host_batch = next(batches)
            if batch_transform is not None:
                host_batch = batch_transform(host_batch, step)
            state, metrics = step_fn(state, _place(host_batch, mesh))
            step += 1
            interval.metrics.append(metrics)
            if step % train.log_every == 0 or step == train.steps:
                line = interval.flush(step, ckpt)
                if step_log is not None:
                    line.update(step_log(step))
                if (peak := peak_memory_bytes()) is not None:
                    line["peak_bytes"] = peak
                writer.write(step, line)
                history.append({"step": step, **line})
                eta.update(step, line)
                progress.update(step, {"loss": line["loss"], "tok/s": f"{line['tokens_per_s']:.0f}",
                                       **{k: v for k, v in line.items() if k == "crd_scale"}})
            if eval_batches is not None and train.eval_batches and (
                    step == train.steps or (train.eval_every and step % train.eval_every == 0)):
                line = evaluate(eval_step, state, eval_batches(), train.eval_batches, mesh)
                writer.write(step, line)
                evals.append({"step": step, **line})
                interval.start = time.perf_counter()  # evaluation time is not training throughput
            if step == train.steps or (checkpoint.every_steps and step % checkpoint.every_steps == 0):
                interval.check_finite(step, ckpt)  # never save a diverged state
                ckpt.save(step, state, data_state=_data_states(batches, shard), meta=meta)
    finally:
        context.close()
        progress.close()
        writer.close()
        ckpt.close()
    return TrainResult(graphdef, state, history, evals, resumed)
