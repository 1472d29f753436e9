"""Training: frozen configs of the loop, optax AdamW, a jitted train step on ``nnx.split`` state, orbax
checkpoints with exact resume (model, optimizer, step, RNG, data iterator; ``config_changes`` guards resume,
``restore_model`` reads a run's model back), metrics and the loop. Floor 6: nothing here imports
``selmerge_jax.evaluation`` or ``selmerge_jax.main`` (``docs/ARCHITECTURE.md``)."""

from selmerge_jax.training.checkpoint import Checkpointer, InitConfig, config_changes, restore_model
from selmerge_jax.training.config import CheckpointConfig, OptimizerConfig, TrainConfig
from selmerge_jax.training.loop import TrainResult, evaluate, train
from selmerge_jax.training.metrics import MetricsWriter, read_jsonl
from selmerge_jax.training.optimizer import build_optimizer, learning_rate_schedule
from selmerge_jax.training.train_step import (
                                              TrainState,
                                              init_train_state,
                                              make_eval_step,
                                              make_train_step,
                                              token_cross_entropy,
)

__all__ = [
                                              "CheckpointConfig",
                                              "Checkpointer",
                                              "InitConfig",
                                              "MetricsWriter",
                                              "OptimizerConfig",
                                              "TrainConfig",
                                              "TrainResult",
                                              "TrainState",
                                              "build_optimizer",
                                              "config_changes",
                                              "evaluate",
                                              "init_train_state",
                                              "learning_rate_schedule",
                                              "make_eval_step",
                                              "make_train_step",
                                              "read_jsonl",
                                              "restore_model",
                                              "token_cross_entropy",
                                              "train",
]
