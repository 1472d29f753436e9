"""Experiment schemas (what ``experiments/configs/*.yaml`` hold) and loading them with presets and overrides.

A YAML file is one of :class:`PretrainConfig`, :class:`FinetuneConfig`, :class:`InferConfig`, section by
section. ``model:`` may name a preset and override any field of it, nested ones included::

    model: {preset: tiny, attention: ms, ms: {block_size: 32}}

Unknown keys and bad values fail with their key path (``model.ms.block_sze: unknown key ...``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

from selmerge_jax.models.config import ModelConfig, preset
from selmerge_jax.models.generate import SamplingConfig
from selmerge_jax.models.lora import LoRAConfig
from selmerge_jax.positional.crd_ntk import CRDNTKConfig
from selmerge_jax.sharding.mesh import MeshConfig
from selmerge_jax.training.config import CheckpointConfig, OptimizerConfig, TrainConfig
from selmerge_jax.training.config_loader import ConfigError, apply_overrides, from_dict, to_dict

__all__ = [
    "DataConfig",
    "FinetuneConfig",
    "InferConfig",
    "InitConfig",
    "PasskeyCheckConfig",
    "PretrainConfig",
    "config_to_dict",
    "expand_model_section",
    "load_experiment",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from.

    Attributes:
      source: a TFDS name (``stdlib_corpus``: the embedded default, built locally on first use; ``pg19``; ...)
        or a prepared TFDS directory. Ignored when ``train_npy`` is set.
      train_split, validation_split: TFDS split strings.
      train_npy, validation_npy: flat pre-tokenized arrays (``.npy``; see ``experiments/pretrain.py
        --export-npy``) read with numpy alone, for machines without TFDS/grain.
      data_dir: TFDS data dir (default ``$SELMERGE_DATA_DIR`` or ``~/.cache/selmerge_jax``).
      tokenizer: null/"byte" for the byte tokenizer, or a path to a ``tokenizer.json`` (or its directory).
      shuffle_window: grain shuffle buffer of windows.
      passkey_ratio: fraction of training windows replaced by passkey-retrieval examples.
      passkey_answer_weight: loss weight of a passkey window's answer tokens (1: like every other token); the
        answer is the only part that needs retrieval (``arrays.TokenWindows``; needs ``train_npy``).
      passkey_min_length: null: one passkey prompt of exactly seq_len + 1 tokens per passkey window (the answer
        always at the window's end); an int: each passkey window packs prompts of random lengths in
        [passkey_min_length, seq_len + 1], so answers land at every position (``arrays.TokenWindows``); at
        most (seq_len + 1) // 3, else a window has no room for a second prompt. Train dense models with
        ``document_masking: true`` then: without it each prompt sees the earlier prompts' keys under the same
        question, and the 25M H100 model never learned retrieval (pk4/pk5; with masking it did, pk7-pk9).
      copy_ratio: fraction of training windows replaced by copy rows (a random token string, period drawn
        from ``copy_period``, repeated): an induction-head curriculum that makes passkey retrieval learnable
        from scratch (``arrays.TokenWindows``; needs ``train_npy``).
      document_masking: keep packed-document ``segment_ids``/positions (dense attention only); false lets
        tokens attend across document boundaries at absolute positions, which select-and-merge needs.
      validation_seed: which validation windows are scored (their shuffle). Separate from ``train.seed`` so runs
        that differ only in their training seed are compared on the same text.
    """

    source: str = "stdlib_corpus"
    train_split: str = "train"
    validation_split: str = "validation"
    train_npy: str | None = None
    validation_npy: str | None = None
    data_dir: str | None = None
    tokenizer: str | None = None
    shuffle_window: int = 64
    passkey_ratio: float = 0.0
    passkey_answer_weight: float = 1.0
    passkey_min_length: int | None = None
    copy_ratio: float = 0.0
    copy_period: tuple[int, int] = (8, 64)
    document_masking: bool = False
    validation_seed: int = 0

    def __post_init__(self):
        if isinstance(self.validation_seed, bool) or not isinstance(self.validation_seed, int) or (
                self.validation_seed < 0):
            raise ValueError(f"DataConfig.validation_seed must be an int >= 0, got {self.validation_seed!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"DataConfig.source must be a dataset name or directory, got {self.source!r}")
        if (self.train_npy is None) != (self.validation_npy is None):
            raise ValueError(f"DataConfig.train_npy={self.train_npy!r} and validation_npy="
                             f"{self.validation_npy!r}: give both or neither")
        if isinstance(self.shuffle_window, bool) or not isinstance(self.shuffle_window, int) or self.shuffle_window < 1:
            raise ValueError(f"DataConfig.shuffle_window must be a positive int, got {self.shuffle_window!r}")
        if not 0.0 <= self.passkey_ratio < 1.0:
            raise ValueError(f"DataConfig.passkey_ratio must be in [0, 1), got {self.passkey_ratio!r}")
        if not 0.0 <= self.copy_ratio < 1.0 - self.passkey_ratio:
            raise ValueError(f"DataConfig.copy_ratio={self.copy_ratio!r} must be in [0, 1 - passkey_ratio = "
                             f"{1.0 - self.passkey_ratio:g})")
        if self.passkey_answer_weight != 1.0 and self.train_npy is None:
            raise ValueError(f"DataConfig.passkey_answer_weight={self.passkey_answer_weight} needs train_npy/"
                             "validation_npy (arrays.TokenWindows); the grain pipeline has passkey_loss='answer'")
        if self.passkey_min_length is not None and self.train_npy is None:
            raise ValueError(f"DataConfig.passkey_min_length={self.passkey_min_length} needs train_npy/"
                             "validation_npy (arrays.TokenWindows packs the prompts)")
        if self.copy_ratio > 0 and self.train_npy is None:
            raise ValueError(f"DataConfig.copy_ratio={self.copy_ratio} needs train_npy/validation_npy: copy rows "
                             "are mixed by arrays.TokenWindows, the grain pipeline has none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Where a fine-tune or inference run gets its weights.

    Attributes:
      kind: "checkpoint" (our orbax run directory; the model config is read from it), "hf" (a local Hugging
        Face Llama/Mistral directory) or "scratch" (random init from ``model``).
      path: the checkpoint directory (``.../checkpoints``) or HF directory.
      step: checkpoint step (default: the newest).
    """

    kind: Literal["checkpoint", "hf", "scratch"] = "scratch"
    path: str | None = None
    step: int | None = None

    def __post_init__(self):
        if self.kind not in ("checkpoint", "hf", "scratch"):
            raise ValueError(f"InitConfig.kind={self.kind!r}; allowed: 'checkpoint', 'hf', 'scratch'")
        if self.kind != "scratch" and not self.path:
            raise ValueError(f"InitConfig.path is required with kind={self.kind!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    model: ModelConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        per_device = self.train.batch_size % self.optimizer.accumulation_steps
        if per_device:
            raise ValueError(f"train.batch_size={self.train.batch_size} must be a multiple of "
                             f"optimizer.accumulation_steps={self.optimizer.accumulation_steps}")
        if self.data.document_masking and self.model.attention != "dense":
            raise ValueError(f"data.document_masking needs model.attention='dense', got {self.model.attention!r}")
        if self.data.passkey_min_length is not None and self.model.attention == "dense" and not (
                self.data.document_masking):
            # Not an error (select-and-merge cannot mask documents, so it packs unmasked by necessity), but on
            # the H100 a dense 25M model never learned retrieval this way and did learn it with masking.
            warnings.warn("data.passkey_min_length packs several passkey prompts per window, and without "
                          "data.document_masking each prompt attends to the earlier prompts' keys; set "
                          "data.document_masking=true for dense models", stacklevel=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(PretrainConfig):
    """Pretrain's sections plus where the weights start, LoRA and CRD NTK (both optional)."""

    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    lora: LoRAConfig | None = None
    crd: CRDNTKConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        if (self.lora is None) != (self.train.trainable == "all"):
            raise ValueError(f"train.trainable={self.train.trainable!r} with lora="
                             f"{'set' if self.lora else 'null'}: use 'lora' exactly when a lora section is given")
        rope = self.model.rope
        if self.crd is not None and (self.crd.theta != rope.theta or self.crd.layout != rope.layout):
            raise ValueError(f"crd.theta={self.crd.theta}/layout={self.crd.layout!r} must match the model's RoPE "
                             f"(model.rope.theta={rope.theta}, layout={rope.layout!r}): CRD NTK rescales that base")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyCheckConfig:
    """Passkey retrieval at given prompt lengths and depths (0 = start of the prompt, 1 = end)."""

    lengths: tuple[int, ...] = (512,)
    depths: tuple[float, ...] = (0.5,)

    def __post_init__(self):
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise ValueError(f"PasskeyCheckConfig.lengths must be non-empty, each >= 64, got {self.lengths!r}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"PasskeyCheckConfig.depths must be non-empty, each in [0, 1], got {self.depths!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferConfig:
    """Load weights, prefill a long prompt, generate; report tokens/s and memory.

    Attributes:
      init: the weights (checkpoint, hf or scratch).
      model: the model config for ``hf``/``scratch`` (with ``checkpoint`` it is read from the run); null keeps
        the stored one.
      prompt: prompt text; null takes ``prompt_tokens`` tokens of the validation corpus (``data``).
      prompt_tokens: prompt length when taken from the corpus.
      max_new_tokens, sampling, chunk_size: generation (see ``selmerge_jax.models.generate``).
      passkey: also run a passkey retrieval check (null skips it).
      output: JSON lines with the measurements go here.
      seed: sampling seed.
    """

    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    model: ModelConfig | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prompt: str | None = None
    prompt_tokens: int = 2048
    max_new_tokens: int = 64
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    chunk_size: int = 256
    passkey: PasskeyCheckConfig | None = None
    output: str = "runs/infer/results.jsonl"
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_tokens", "max_new_tokens", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InferConfig.{name} must be a positive int, got {value!r}")
        if self.init.kind != "checkpoint" and self.model is None:
            raise ValueError(f"InferConfig.model is required with init.kind={self.init.kind!r}")


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def expand_model_section(section, path: str = "model"):
    """``{preset: tiny, ...overrides}`` -> the preset's full field dict with the overrides merged in."""
    if not isinstance(section, Mapping) or "preset" not in section:
        return section
    overrides = {k: v for k, v in section.items() if k != "preset"}
    try:
        base = to_dict(preset(section["preset"]))
    except ValueError as e:
        raise ConfigError(f"{path}.preset: {e}") from e
    return _deep_merge(base, overrides)


def load_experiment(cls, path: str | None = None, overrides: Sequence[str] = ()):
    """Reads ``path`` (YAML), applies ``--set`` overrides, expands model presets and validates into ``cls``."""
    import yaml

    data = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    if data.get("model") is not None:
        data["model"] = expand_model_section(data["model"])
    return from_dict(cls, data)


def config_to_dict(config) -> dict:
    """The config as plain YAML/JSON data (stored in checkpoints so a run can be rebuilt from them)."""
    return to_dict(config)


# What a resumed run may change: its length and bookkeeping, where files live, the device mesh. Anything else
# (model, data mix, optimizer, seed, CRD schedule...) makes "resume" continue a different experiment.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.progress",
                     "train.output_dir", "checkpoint.", "mesh.", "init.", "data.data_dir", "data.train_npy",
                     "data.validation_npy")


def config_changes(stored: Mapping, current: Mapping, allowed: Sequence[str] = RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose values differ between two ``config_to_dict`` trees, leaving out ``allowed`` keys and
    prefixes (ending in '.'); tuples and lists compare equal.

    A key on one side only is a field the other version of the code did not have (a checkpoint written before
    a field with a default was added): not a change. A value on one side where the other has a section (``crd:
    null`` against ``crd: {...}``) is.
    """
    flat_a, flat_b = _flatten(stored), _flatten(current)
    changed = {k for k in set(flat_a) & set(flat_b) if flat_a[k] != flat_b[k]}
    for key in set(flat_a) ^ set(flat_b):
        other = flat_b if key in flat_a else flat_a
        if any(o.startswith(key + ".") for o in other):
            changed.add(key)
    ok = lambda k: any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)
    return sorted(k for k in changed if not ok(k))


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, Mapping) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: _plain(tree)}


def _plain(value):
    """JSON's view of a value (a checkpoint stores lists where the config holds tuples)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
