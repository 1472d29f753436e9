"""Experiment schemas (what ``selmerge_jax/main/configs/*.yaml`` and ``experiments/configs/*.yaml`` hold),
loading them with presets and ``--set`` overrides, and the command line every experiment script shares.

``--config`` takes a YAML path (relative to the working directory) or the name of a config shipped with the
package (``demo``, ``pretrain``, ``finetune``, ``infer``, ``eval_passkey``...: :func:`packaged_configs`), so
the console scripts work from any directory and without the repository.

A YAML file is one of :class:`PretrainConfig`, :class:`FinetuneConfig`, :class:`InferConfig` (or an evaluation
study's config), section by section; each section is the config class of the floor that uses it
(``models.ModelConfig``, ``data.DataConfig``, ``training.TrainConfig``,
``training.checkpoint.InitConfig``...). ``model:`` may name a preset and override any field of it, nested ones
included::

    model: {preset: tiny, attention: ms, ms: {block_size: 32}}

Unknown keys and bad values fail with their key path (``model.ms.block_sze: unknown key ...``). Values given
with ``--set`` are parsed as YAML scalars (``--set train.steps=100`` is an int, ``--set model.attention=ms`` a
string).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from selmerge_jax.config_io import ConfigError, from_dict, to_dict
from selmerge_jax.data.config import DataConfig
from selmerge_jax.models.config import ModelConfig, preset
from selmerge_jax.models.generate import SamplingConfig
from selmerge_jax.models.lora import LoRAConfig
from selmerge_jax.positional.crd_ntk import CRDNTKConfig
from selmerge_jax.sharding import distributed
from selmerge_jax.sharding.mesh import MeshConfig
from selmerge_jax.training.checkpoint import InitConfig, stored_config
from selmerge_jax.training.config import CheckpointConfig, OptimizerConfig, TrainConfig
from selmerge_jax.validation import UserError, check_positive_int

__all__ = [
    "FinetuneConfig",
    "InferConfig",
    "PasskeyCheckConfig",
    "PretrainConfig",
    "apply_overrides",
    "config_to_dict",
    "configure_logging",
    "expand_model_section",
    "experiment_parser",
    "load_config",
    "load_experiment",
    "load_from_args",
    "packaged_configs",
    "parse_override",
    "print_summary",
    "resolve_config_path",
    "with_checkpoint_model",
]

T = TypeVar("T")

# The default configs of the entry points, shipped inside the package (package data).
PACKAGED_CONFIGS = pathlib.Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (``--config demo`` reads ``configs/demo.yaml``)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(name: str) -> str:
    """A ``--config`` value as a file: an existing path (relative to the working directory), else a packaged
    config's name (with or without ``.yaml``); anything else is a :class:`UserError` listing both."""
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        return path
    stem = pathlib.Path(name).name.removesuffix(".yaml")
    if os.sep not in name and "/" not in name and (PACKAGED_CONFIGS / f"{stem}.yaml").is_file():
        return str(PACKAGED_CONFIGS / f"{stem}.yaml")
    raise UserError(f"config {name!r}: no such file (relative to {os.getcwd()}) and no packaged config of "
                    f"that name; packaged: {', '.join(packaged_configs())}")


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
        if self.model is None:
            return  # a fine-tune that takes the model from its checkpoint: checked once resolved
        if self.data.document_masking and self.model.attention != "dense":
            raise ValueError("data.document_masking needs model.attention='dense', got "
                             f"{self.model.attention!r}")
        if self.data.passkey_min_length is not None and self.model.attention == "dense" and not (
                self.data.document_masking):
            # Not an error (select-and-merge cannot mask documents, so it packs unmasked by necessity), but on
            # the H100 a dense 25M model never learned retrieval this way and did learn it with masking.
            warnings.warn("data.passkey_min_length packs several passkey prompts per window, and without "
                          "data.document_masking each prompt attends to the earlier prompts' keys; set "
                          "data.document_masking=true for dense models", stacklevel=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(PretrainConfig):
    """Pretrain's sections plus where the weights start, LoRA and CRD NTK (both optional).

    With ``init.kind: checkpoint`` the ``model`` section is optional: null takes the checkpoint's model config
    (:func:`with_checkpoint_model`), and a section without ``preset`` is merged over it when the YAML is
    loaded (``model: {attention: dense}`` changes only the attention).
    """

    model: ModelConfig | None = None  # type: ignore[assignment]
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    lora: LoRAConfig | None = None
    crd: CRDNTKConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        if (self.lora is None) != (self.train.trainable == "all"):
            raise ValueError(f"train.trainable={self.train.trainable!r} with lora="
                             f"{'set' if self.lora else 'null'}: use 'lora' exactly when "
                             "a lora section is given")
        if self.model is None:
            if self.init.kind != "checkpoint":
                raise ValueError(f"model is required with init.kind={self.init.kind!r} (only a checkpoint "
                                 "brings its own model config)")
            return
        rope = self.model.rope
        if self.crd is not None and (self.crd.theta != rope.theta or self.crd.layout != rope.layout):
            raise ValueError(f"crd.theta={self.crd.theta}/layout={self.crd.layout!r} must "
                             "match the model's RoPE "
                             f"(model.rope.theta={rope.theta}, layout={rope.layout!r}): "
                             "CRD NTK rescales that base")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyCheckConfig:
    """Passkey retrieval at given prompt lengths and depths (0 = start of the prompt, 1 = end)."""

    lengths: tuple[int, ...] = (512,)
    depths: tuple[float, ...] = (0.5,)

    def __post_init__(self):
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise ValueError(f"PasskeyCheckConfig.lengths must be non-empty, each >= 64, "
                             f"got {self.lengths!r}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError("PasskeyCheckConfig.depths must be non-empty, each in [0, "
                             f"1], got {self.depths!r}")


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
            check_positive_int(f"InferConfig.{name}", getattr(self, name))
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
    """Reads ``path`` (YAML file or packaged config name, :func:`resolve_config_path`), applies ``--set``
    overrides, expands model presets and validates into ``cls``. A fine-tune from a checkpoint whose model
    section has no preset gets it merged over the checkpoint's model config."""
    data = apply_overrides(_read_yaml(None if path is None else resolve_config_path(path)), overrides)
    model, init = data.get("model"), data.get("init")
    if (isinstance(model, Mapping) and model and "preset" not in model and isinstance(init, Mapping)
            and init.get("kind") == "checkpoint" and any(f.name == "init" for f in dataclasses.fields(cls))):
        data["model"] = _deep_merge(_checkpoint_model(init), model)
    if data.get("model") is not None:
        data["model"] = expand_model_section(data["model"])
    return from_dict(cls, data)


def _checkpoint_model(init: Mapping) -> dict:
    """The model section stored with the checkpoint that ``init`` (a plain dict) names."""
    stored = stored_config(init.get("path"), init.get("step"))
    if not isinstance(stored.get("model"), Mapping):
        raise UserError(f"init.path={init.get('path')!r}: the checkpoint stores no model config")
    return dict(stored["model"])


def with_checkpoint_model(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with ``model`` taken from the checkpoint it starts from when it has none (re-validated)."""
    if cfg.model is not None:
        return cfg
    stored = stored_config(cfg.init.path, cfg.init.step)
    return dataclasses.replace(cfg, model=from_dict(ModelConfig, stored.get("model"), "model"))


def config_to_dict(config) -> dict:
    """The config as plain YAML/JSON data (stored in checkpoints so a run can be rebuilt from them)."""
    return to_dict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> ``(["a", "b"], 1)``; the value is parsed as a YAML scalar/flow value."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty component in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
    return parts, value


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """Returns a deep copy of ``data`` with each ``key.path=value`` set (missing sections are created)."""
    result = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set "
                                  f"{'.'.join(parts)} below it")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data):
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Reads YAML at ``path`` (or starts empty), applies ``overrides`` and validates into ``cls`` (no presets:
    :func:`load_experiment` is what the scripts use)."""
    return from_dict(cls, apply_overrides(_read_yaml(path), overrides))


def experiment_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    """The command line every experiment script shares: ``--config x.yaml --set a.b=value [--set ...]``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config,
                        help=f"YAML config file or packaged config name (default: {default_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (YAML syntax), e.g. --set train.steps=100; "
                             "repeatable")
    return parser


def configure_logging(level: int = logging.INFO) -> None:
    """Makes the package's info lines print. JAX and orbax import absl, which puts a handler on the root
    logger at WARNING, so ``logging.basicConfig`` does nothing; the package's logger gets its own stderr
    handler instead (other libraries stay at their quieter defaults, orbax's absl lines are dropped)."""
    logger = logging.getLogger("selmerge_jax")
    logger.setLevel(level)
    if not any(getattr(h, "_selmerge_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._selmerge_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    # orbax logs through absl: warnings about items it was not asked to restore, and, when a checkpoint file
    # is unreadable, each failed array read with its traceback from worker threads, around the one-line
    # CheckpointError that already names the step and directory
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def load_from_args(cls, args: argparse.Namespace):
    """The validated config, or exit code 2 with the offending key path (no traceback for a typo)."""
    configure_logging()
    try:
        return load_experiment(cls, args.config, args.set)
    except UserError as e:  # ConfigError included
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def print_summary(summary: dict):
    """``SUMMARY {json}`` on stdout, once per job (process 0 of a multi-process one)."""
    if not distributed.is_primary():
        return
    print("SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)
