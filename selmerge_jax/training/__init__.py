"""Training: frozen configs and a YAML loader, optax AdamW, a jitted train step on ``nnx.split`` state,
orbax checkpoints with exact resume (model, optimizer, step, RNG, data iterator), metrics and the loop."""

from selmerge_jax.training.checkpoint import Checkpointer
from selmerge_jax.training.config import CheckpointConfig, OptimizerConfig, TrainConfig
from selmerge_jax.training.config_loader import ConfigError, apply_overrides, from_dict, load_config, to_dict
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
                                              "ConfigError",
                                              "MetricsWriter",
                                              "OptimizerConfig",
                                              "TrainConfig",
                                              "TrainResult",
                                              "TrainState",
                                              "apply_overrides",
                                              "build_optimizer",
                                              "evaluate",
                                              "from_dict",
                                              "init_train_state",
                                              "learning_rate_schedule",
                                              "load_config",
                                              "make_eval_step",
                                              "make_train_step",
                                              "read_jsonl",
                                              "to_dict",
                                              "token_cross_entropy",
                                              "train",
]
