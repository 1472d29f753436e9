"""Every shipped YAML config validates; unknown keys and bad values are rejected naming the key path."""

import dataclasses
import pathlib
from typing import Literal

import pytest

from selmerge_jax.config_io import ConfigError, from_dict, to_dict
from selmerge_jax.main.config import (
    FinetuneConfig,
    InferConfig,
    PretrainConfig,
    apply_overrides,
    load_experiment,
    parse_override,
)
from selmerge_jax.main.evaluate import config_schema

ROOT = pathlib.Path(__file__).parents[1]
# the entry points' defaults ship with the package; the studies' configs stay in the repository
STUDIES = ROOT / "experiments" / "configs"
CONFIGS = sorted([*(ROOT / "selmerge_jax" / "main" / "configs").glob("*.yaml"), *STUDIES.glob("*.yaml")])


def _schema(path: pathlib.Path):
    """Config files are typed by name: finetune*.yaml, infer*.yaml, eval_*.yaml, everything else pretrains."""
    if path.stem.startswith("eval_"):
        return config_schema(path.stem)
    if path.stem.startswith("finetune"):
        return FinetuneConfig
    return InferConfig if path.stem.startswith("infer") else PretrainConfig


def test_the_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"pretrain.yaml", "finetune.yaml", "infer.yaml", "demo.yaml", "gpu_25m_ms.yaml",
            "gpu_25m_dense.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path):
    cls = _schema(path)
    cfg = load_experiment(cls, str(path))
    assert isinstance(cfg, cls)
    assert from_dict(cls, to_dict(cfg)) == cfg  # what a checkpoint stores rebuilds the same config


def test_gpu_pair_differs_only_in_attention_and_dense_memory_knob():
    ms = to_dict(load_experiment(PretrainConfig, str(STUDIES / "gpu_25m_ms.yaml")))
    dense = to_dict(load_experiment(PretrainConfig, str(STUDIES / "gpu_25m_dense.yaml")))
    assert ms["model"].pop("attention") == "ms" and dense["model"].pop("attention") == "dense"
    ms["train"].pop("output_dir"), dense["train"].pop("output_dir")
    ms["optimizer"].pop("accumulation_steps"), dense["optimizer"].pop("accumulation_steps")
    assert ms == dense  # same model, data, seed, batch and steps: the same tokens


DEMO = "demo"  # a packaged config, by name


@pytest.mark.parametrize("override, message", [
    ("model.ms.block_sze=32", "model.ms.block_sze: unknown key for MSAttentionConfig"),
    ("trian.steps=3", "trian: unknown key for PretrainConfig"),
    ("train.steps=-1", "train: TrainConfig.steps=-1: must be an int >= 1"),
    ("train.steps=ten", "train.steps: expected an int, got 'ten'"),
    # YAML 1.1 str
    ("optimizer.learning_rate=3e-3", "optimizer.learning_rate: expected a number, got '3e-3'"),
    ("model.attention=flash", "model.attention: 'flash' is not allowed"),
    ("train.compute_dtype=fp16",
     "train.compute_dtype: 'fp16' is not allowed; allowed: 'float32', 'bfloat16'"),
    ("checkpoint.async_save=1", "checkpoint.async_save: expected true/false, got 1"),
    ("model.preset=gpt5", "model.preset: preset='gpt5': must be one of the allowed values; allowed: 'tiny'"),
    ("mesh.data=0", "mesh: MeshConfig.data=0: must be a positive int or -1"),
    ("train.seq_len.x=1", "train.seq_len: is a value, cannot set train.seq_len.x below it"),
])
def test_bad_keys_and_values_name_their_path(override, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(PretrainConfig, DEMO, [override])
    assert message in str(err.value)


def test_cross_section_checks():
    with pytest.raises(ConfigError, match=r"document_masking needs model\.attention='dense'"):
        load_experiment(PretrainConfig, DEMO, ["data.document_masking=true"])
    with pytest.raises(ConfigError, match=r"must be a multiple of optimizer\.accumulation_steps=3"):
        load_experiment(PretrainConfig, DEMO, ["optimizer.accumulation_steps=3"])
    finetune = "finetune"
    with pytest.raises(ConfigError, match="use 'lora' exactly when a lora section is given"):
        load_experiment(FinetuneConfig, finetune, ["lora=null"])
    # crd_forward keeps the segment mask and per-document positions (tests/test_crd_ntk.py), so packing is
    # allowed
    cfg = load_experiment(FinetuneConfig, finetune, ["model.preset=tiny", "model.attention=dense",
                                                     "data.document_masking=true"])
    assert cfg.crd is not None and cfg.data.document_masking


def test_overrides_merge_into_presets_and_parse_yaml_values():
    cfg = load_experiment(PretrainConfig, DEMO, ["model.ms.block_size=32", "train.steps=7",
                                                 "optimizer.clip_norm=null", "model.d_model=128"])
    assert cfg.model.ms.block_size == 32 and cfg.model.ms.top_k == 4  # the preset's other ms fields stay
    assert cfg.model.num_layers == 2 and cfg.model.d_model == 128
    assert cfg.train.steps == 7 and cfg.optimizer.clip_norm is None
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x", "d.e=2"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": 2}}
    with pytest.raises(ConfigError, match=r"must look like key\.path=value"):
        parse_override("train.steps")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inner:
    sizes: tuple[int, ...] = (1,)
    pair: tuple[int, str] = (0, "a")
    kind: Literal["x", "y"] = "x"
    maybe: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    flag: bool = False


def test_loader_types():
    cfg = from_dict(_Outer, {"inner": {"sizes": [1, 2, 3], "pair": [4, "b"], "maybe": 2}, "flag": True})
    assert cfg.inner.sizes == (1, 2, 3) and cfg.inner.pair == (4, "b") and cfg.inner.maybe == 2.0
    with pytest.raises(ConfigError, match=r"inner.sizes\[1\]: expected an int, got 'x'"):
        from_dict(_Outer, {"inner": {"sizes": [1, "x"]}})
    with pytest.raises(ConfigError, match=r"inner\.pair: expected 2 items, got 1"):
        from_dict(_Outer, {"inner": {"pair": [1]}})
    with pytest.raises(ConfigError, match="inner: expected a mapping for _Inner, got 3"):
        from_dict(_Outer, {"inner": 3})
    with pytest.raises(ConfigError, match=r"inner\.kind: 'z' is not allowed"):
        from_dict(_Outer, {"inner": {"kind": "z"}})


def test_packed_passkeys_without_document_masking_warn_for_dense_models():
    base = ["model.attention=dense", "data.train_npy=/x/train.npy", "data.validation_npy=/x/val.npy",
            "data.passkey_ratio=0.5", "data.passkey_min_length=64"]
    with pytest.warns(UserWarning, match="data.document_masking=true for dense models"):
        load_experiment(PretrainConfig, DEMO, base)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_experiment(PretrainConfig, DEMO, [*base, "data.document_masking=true"])
        load_experiment(PretrainConfig, DEMO, [*base[1:], "model.attention=ms"])  # ms cannot mask: no warning
