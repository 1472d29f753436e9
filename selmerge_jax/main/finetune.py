"""``experiments/finetune.py``: fine-tune from our checkpoint, a local Hugging Face model or scratch, full or
LoRA, optionally with CRD NTK (its training forward is here); ``main(config)`` trains, plots and
summarises."""

from __future__ import annotations

import os

from flax import nnx

from selmerge_jax.main.config import FinetuneConfig
from selmerge_jax.main.pretrain import (
    build_model,
    plot_loss_curve,
    run_training,
    train_summary,
    with_model_config,
)
from selmerge_jax.models import Llama
from selmerge_jax.models.lora import apply_lora
from selmerge_jax.positional.crd_ntk import CRDNTKConfig, crd_step
from selmerge_jax.sharding import distributed
from selmerge_jax.training.checkpoint import restore_model
from selmerge_jax.training.loop import TrainResult
from selmerge_jax.training.train_step import HiddenStates, StepContext, default_forward

__all__ = ["crd_forward", "main", "run_finetune"]


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


def run_finetune(cfg: FinetuneConfig) -> TrainResult:
    """Fine-tunes from ``cfg.init`` (our checkpoint, an HF directory or scratch), with LoRA/CRD if
    configured."""
    if cfg.init.kind == "checkpoint":
        model, _ = restore_model(cfg.init.path, step=cfg.init.step)
        model = with_model_config(model, cfg.model)
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.train.seed + 1))
    else:
        model = build_model(cfg)
    forward = crd_forward(cfg.crd) if cfg.crd is not None else default_forward
    # Validation stays on plain positions with the model's own RoPE: CRD NTK is a training augmentation.
    return run_training(cfg, model, "finetune", forward=forward)


@distributed.entry_point
def main(config: FinetuneConfig) -> dict:
    """Fine-tunes, writes ``loss_curve.png`` beside the run's metrics and returns the run's key figures."""
    result = run_finetune(config)
    out = config.train.output_dir
    plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
    return train_summary(config, result)
