"""``experiments/finetune.py``: fine-tune from our checkpoint, a local Hugging Face model or scratch, full or
LoRA, optionally with CRD NTK (its training forward is here); ``main(config)`` trains, plots and
summarises."""

from __future__ import annotations

import os

from flax import nnx

from selmerge_jax.main.config import FinetuneConfig, with_checkpoint_model
from selmerge_jax.main.pretrain import (
    build_model,
    plot_loss_curve,
    run_training,
    train_summary,
    with_model_config,
)
from selmerge_jax.models import Llama
from selmerge_jax.models.lora import apply_lora
from selmerge_jax.positional.crd_ntk import CRDNTKConfig, crd_scale, crd_step
from selmerge_jax.sharding import distributed
from selmerge_jax.training.checkpoint import restore_model
from selmerge_jax.training.loop import TrainResult
from selmerge_jax.training.train_step import HiddenStates, StepContext, default_forward

__all__ = ["crd_forward", "crd_step_log", "main", "run_finetune"]


def crd_forward(crd: CRDNTKConfig):
    """The training forward of CRD NTK: every step draws cycled positions (modulo C, random start per row) and
    the stage's NTK base inside the jitted step, from the step's own key, so resume replays them exactly.

    The step's ``CRDPositions`` go through ``Llama.__call__`` like plain positions (every layer's RoPE reads
    its traced frequencies), so the model's remat policy applies as in any other forward. A packed batch
    (``data.document_masking``) keeps its segment mask, and each document's own positions are shifted by the
    row's offset, so documents neither see each other nor start mid-cycle relative to one another.
    """
    def forward(model: Llama, inputs: dict, ctx: StepContext):
        tokens = inputs["tokens"]
        b, t = tokens.shape
        positions = crd_step(crd, ctx.step, ctx.key, batch=b, seq_len=t, head_dim=model.config.head_size,
                             base_positions=inputs.get("positions"))
        h = model.hidden_states(tokens, positions, segment_ids=inputs.get("segment_ids"))[0]
        return HiddenStates(h, model.output_logits)

    return forward


def crd_step_log(crd: CRDNTKConfig):
    """``step -> {"crd_scale": s}``: the NTK scale the step ended at ``step`` trained with (its forward saw
    ``ctx.step = step - 1``), for every metrics line."""
    return lambda step: {"crd_scale": float(crd_scale(crd, step - 1))}


def run_finetune(cfg: FinetuneConfig) -> TrainResult:
    """Fine-tunes from ``cfg.init`` (our checkpoint, an HF directory or scratch), with LoRA/CRD if
    configured; without a ``model`` section the checkpoint's model config is used."""
    cfg = with_checkpoint_model(cfg)
    if cfg.init.kind == "checkpoint":
        model, _ = restore_model(cfg.init.path, step=cfg.init.step)
        model = with_model_config(model, cfg.model)
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.train.seed + 1))
    else:
        model = build_model(cfg)
    forward = crd_forward(cfg.crd) if cfg.crd is not None else default_forward
    step_log = crd_step_log(cfg.crd) if cfg.crd is not None else None
    # Validation stays on plain positions with the model's own RoPE: CRD NTK is a training augmentation.
    return run_training(cfg, model, "finetune", forward=forward, step_log=step_log)


@distributed.entry_point
def main(config: FinetuneConfig) -> dict:
    """Fine-tunes, writes ``loss_curve.png`` beside the run's metrics and returns the run's key figures."""
    config = with_checkpoint_model(config)
    result = run_finetune(config)
    out = config.train.output_dir
    plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
    return train_summary(config, result)
