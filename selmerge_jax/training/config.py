"""Frozen configs of the training loop: optimizer, steps/batching, checkpoints. Validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Literal

from selmerge_jax.validation import check_choice, check_int, check_number

__all__ = ["CheckpointConfig", "OptimizerConfig", "TrainConfig", "WandbConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warmup then a cosine decay (to ``min_lr_ratio * learning_rate``) or a constant rate.

    Attributes:
      learning_rate: peak rate after warmup.
      schedule: "cosine" (decays over the run's remaining steps) or "constant".
      warmup_steps: linear warmup from 0 (optimizer steps, not micro-batches).
      min_lr_ratio: the cosine schedule's floor as a fraction of the peak.
      weight_decay: decoupled decay, applied to matrices only (biases, norms and 1-D params are exempt).
      b1, b2, eps: Adam moments.
      clip_norm: clip the global gradient norm to this value; null disables clipping.
      accumulation_steps: micro-batches per optimizer step; ``train.batch_size`` is split across them.
    """

    learning_rate: float = 3e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    accumulation_steps: int = 1

    def __post_init__(self):
        own = "OptimizerConfig"
        check_number(f"{own}.learning_rate", self.learning_rate, 0.0, 10.0, low_open=True)
        check_choice(f"{own}.schedule", self.schedule, ("cosine", "constant"))
        check_int(f"{own}.warmup_steps", self.warmup_steps, 0)
        check_number(f"{own}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number(f"{own}.weight_decay", self.weight_decay, 0.0, 10.0)
        check_number(f"{own}.b1", self.b1, 0.0, 1.0)
        check_number(f"{own}.b2", self.b2, 0.0, 1.0)
        check_number(f"{own}.eps", self.eps, 0.0, 1.0, low_open=True)
        if self.clip_norm is not None:
            check_number(f"{own}.clip_norm", self.clip_norm, 0.0, low_open=True)
        check_int(f"{own}.accumulation_steps", self.accumulation_steps, 1, 4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """Weights & Biases logging beside TensorBoard (needs ``pip install wandb``; off unless this section is
    given).

    Attributes:
      project: the W&B project.
      name: the run's name (default: W&B picks one).
      entity: the team or user (default: the logged-in user's).
      mode: "online", "offline" (write locally, ``wandb sync`` later) or "disabled".
      tags: labels of the run.
    """

    project: str
    name: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.project, str) or not self.project:
            raise ValueError(f"WandbConfig.project={self.project!r}: must be a non-empty string")
        check_choice("WandbConfig.mode", self.mode, ("online", "offline", "disabled"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How long and on what shapes to train, and what to log.

    Attributes:
      steps: optimizer steps in the whole run (a resumed run continues to this total).
      batch_size: sequences per optimizer step, all devices and micro-batches together.
      seq_len: tokens per sequence the model sees (inputs; targets are the same tokens shifted by one).
      seed: model init, data order and dropout all derive from it.
      compute_dtype: "float32" or "bfloat16" (params and optimizer state stay float32; the forward and
      backward
        run in this dtype; the loss is computed in float32).
      trainable: "all" parameters, or only the "lora" adapters (the base stays frozen and is not in the
        optimizer state).
      log_every: steps between metric lines (JSONL, TensorBoard, progress bar).
      eval_every: steps between validation passes; 0 evaluates only at the end.
      eval_batches: validation batches per pass.
      output_dir: metrics, plots and (by default) checkpoints go here.
      progress: show a progress bar (loss, tokens/s, ETA).
      wandb: also log the metrics to Weights & Biases (null: off).
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 1024
    seed: int = 0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    trainable: Literal["all", "lora"] = "all"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    output_dir: str = "runs/default"
    progress: bool = True
    wandb: WandbConfig | None = None

    def __post_init__(self):
        own = "TrainConfig"
        check_int(f"{own}.steps", self.steps, 1)
        check_int(f"{own}.batch_size", self.batch_size, 1)
        check_int(f"{own}.seq_len", self.seq_len, 2)
        check_int(f"{own}.seed", self.seed, 0)
        check_choice(f"{own}.compute_dtype", self.compute_dtype, ("float32", "bfloat16"))
        check_choice(f"{own}.trainable", self.trainable, ("all", "lora"))
        check_int(f"{own}.log_every", self.log_every, 1)
        check_int(f"{own}.eval_every", self.eval_every, 0)
        check_int(f"{own}.eval_batches", self.eval_batches, 0)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"{own}.output_dir must be a non-empty path, got {self.output_dir!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints (see ``selmerge_jax.training.checkpoint``).

    Attributes:
      directory: where step folders go; null means ``<train.output_dir>/checkpoints``.
      every_steps: save every this many optimizer steps (and always at the end); 0 saves only at the end.
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread while training continues.
      resume: restore the newest checkpoint in ``directory`` if there is one.
      allow_changes: config fields a resumed run may change (``training.checkpoint.allowed_change``: a dotted
        key, its last components such as ``steps`` or ``learning_rate``, or a prefix ending in '.'); every
        accepted difference is logged. Other differences from the stored config refuse to resume.
    """

    directory: str | None = None
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    allow_changes: tuple[str, ...] = ()

    def __post_init__(self):
        own = "CheckpointConfig"
        for name in self.allow_changes:
            if not isinstance(name, str) or not name.strip(".") or " " in name:
                raise ValueError(f"{own}.allow_changes: {name!r} must be a config field such as "
                                 "train.steps, steps or learning_rate")
        if self.directory is not None and (not isinstance(self.directory, str) or not self.directory):
            raise ValueError(f"{own}.directory must be null or a non-empty path, got {self.directory!r}")
        check_int(f"{own}.every_steps", self.every_steps, 0)
        check_int(f"{own}.keep", self.keep, 1)
