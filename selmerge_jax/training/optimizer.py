"""Optax AdamW with warmup + cosine/constant schedules and global-norm clipping, from ``OptimizerConfig``."""

from __future__ import annotations

import jax
import optax

from selmerge_jax.training.config import OptimizerConfig
from selmerge_jax.validation import check_positive_int

__all__ = ["build_optimizer", "decay_mask", "learning_rate_schedule"]


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine to ``min_lr_ratio * peak`` at ``total_steps`` (or constant)."""
    check_positive_int("total_steps", total_steps)
    peak, warmup = config.learning_rate, min(config.warmup_steps, total_steps)
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        # Cosine over what is left after warmup; at least one step so a warmup-only run is still well defined.
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=config.min_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: decaying norm scales and biases pulls them to 0 and hurts training."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def build_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                          optax.Schedule]:
    """Returns ``(tx, schedule)``: clip (if set) then AdamW on the schedule; the schedule is for logging."""
    schedule = learning_rate_schedule(config, total_steps)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.clip_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw), schedule
