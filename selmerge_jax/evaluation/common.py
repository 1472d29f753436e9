"""What every evaluation study shares: where the model comes from, swapping its inference-time position rule,
the validation token stream, and writing results (JSON with device/version provenance).

A study never trains here; it takes weights from a checkpoint of our training runs, a local Hugging Face
directory, or a fresh initialisation (``scratch``: only for smoke tests of the pipeline itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from selmerge_jax import data as data_lib
from selmerge_jax.config_io import from_dict
from selmerge_jax.data.config import DataConfig
from selmerge_jax.models import Llama, load_hf
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.lora import adapters_like
from selmerge_jax.positional import RopeConfig
from selmerge_jax.positional.crd_ntk import CRDNTKConfig
from selmerge_jax.training.checkpoint import InitConfig, restore_model
from selmerge_jax.validation import check_int_sequence, check_number_sequence

__all__ = [
    "ModelSource",
    "check_fractions",
    "check_positive_ints",
    "crd_inference_rope",
    "load_model",
    "progress",
    "provenance",
    "rope_label",
    "validation_tokens",
    "with_config",
    "with_rope",
    "write_json",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Weights and (optionally) a changed model config for evaluation.

    Attributes:
      init: checkpoint / hf / scratch (see ``training.checkpoint.InitConfig``).
      model: required for ``hf``/``scratch``; with ``checkpoint`` it replaces the stored config while keeping
        the weights (e.g. ``attention: dense`` to evaluate an ms-trained model densely).
      rope: the position rule at inference (e.g. ``{rope_type: ntk, factor: 16}``, the CRD NTK fixed-base
        rule); null keeps the model's own.
      seed: initialisation seed for ``scratch``.
    """

    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    model: ModelConfig | None = None
    rope: RopeConfig | None = None
    seed: int = 0

    def __post_init__(self):
        if self.init.kind != "checkpoint" and self.model is None:
            raise ValueError(f"ModelSource.model is required with init.kind={self.init.kind!r}")


def with_config(model: Llama, config: ModelConfig) -> Llama:
    """The same weights (LoRA adapters included) under another config of identical parameter shapes
    (attention kind, RoPE rule...)."""
    _, state = nnx.split(model)
    fresh = lambda: adapters_like(Llama(config, rngs=nnx.Rngs(0)), model)
    fresh_graphdef, fresh_state = nnx.split(nnx.eval_shape(fresh))
    shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
    if shapes(fresh_state) != shapes(state):
        raise ValueError("the new model config changes parameter shapes; only "
                         "attention/RoPE/numerics may change")
    return nnx.merge(fresh_graphdef, state)


def with_rope(model: Llama, rope: RopeConfig | None) -> Llama:
    """``model`` with its RoPE rule replaced (None: unchanged). Frequencies are trace-time constants, so this
    is a config swap, not a weight change."""
    if rope is None:
        return model
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a RopeConfig or None, got {type(rope).__name__}")
    return with_config(model, model.config.replace(rope=rope))


def crd_inference_rope(stored_config: dict) -> RopeConfig | None:
    """The fixed-base NTK rule (``theta * A^(d/(d-2))``, positions unwrapped) of a run trained with CRD NTK,
    from its stored config; None for a run without a ``crd`` section."""
    raw = stored_config.get("crd") if isinstance(stored_config, dict) else None
    return None if not raw else from_dict(CRDNTKConfig, raw, "crd").inference_rope_config()


def load_model(source: ModelSource) -> Llama:
    """The model a study evaluates, with ``source.model`` and ``source.rope`` applied. A checkpoint of a CRD
    NTK run gets that run's fixed-base inference rule unless ``source.rope`` names another one (the training
    forward drew its own cycled positions and bases; the stored model config's RoPE is not what it
    learned)."""
    init = source.init
    if init.kind == "checkpoint":
        model, stored = restore_model(init.path, step=init.step)
        if source.model is not None:
            model = with_config(model, source.model)
        if source.rope is None:  # an explicit rule wins; otherwise a CRD NTK run infers with its own
            return with_rope(model, crd_inference_rope(stored))
    elif init.kind == "hf":
        m = source.model
        model = load_hf(init.path, attention=m.attention, ms=m.ms, ms_kernel=m.ms_kernel)
    else:
        model = Llama(source.model, rngs=nnx.Rngs(source.seed))
    return with_rope(model, source.rope)


def validation_tokens(data: DataConfig, tokenizer, count: int) -> np.ndarray:
    """The first ``count`` tokens of the held-out split (documents joined with bos/eos), int32 ``[count]``."""
    if data.validation_npy is not None:
        tokens = np.load(os.path.expanduser(data.validation_npy), mmap_mode="r")[:count]
    else:
        if data.source == "stdlib_corpus":
            data_lib.build_stdlib_corpus(data.data_dir)
        parts, total = [], 0
        for doc in data_lib.text_source(data.source, data.validation_split, data.data_dir):
            parts.append(tokenizer.encode(doc, add_bos=True, add_eos=True))
            total += len(parts[-1])
            if total >= count:
                break
        tokens = np.concatenate(parts)[:count] if parts else np.zeros((0,), np.int32)
    if len(tokens) < count:
        raise ValueError(f"the validation split holds only {len(tokens)} tokens; {count} were asked for")
    return np.asarray(tokens, np.int32)


def rope_label(rope) -> str:
    """A plot title's name for a position rule (a ``RopeConfig`` or its dict): type, factor and log-n."""
    rope = rope if isinstance(rope, dict) else dataclasses.asdict(rope)
    label = rope["rope_type"] + (f" x{rope['factor']:g}" if rope["rope_type"] != "default" else "")
    return label + (f", log-n {rope['logn_length']}" if rope.get("logn_length") else "")


def progress(items: Iterable, desc: str, *, unit: str = "step", total: int | None = None):
    """``items`` with a tqdm bar on stderr named ``desc`` (every study loop that can run for minutes uses it).

    Shown on a terminal, hidden otherwise (logs, CI); ``SELMERGE_PROGRESS=1`` / ``0`` forces it on / off.
    """
    forced = os.environ.get("SELMERGE_PROGRESS")
    disable = None if forced is None else forced in ("0", "false", "")  # None: tqdm hides it off a TTY
    return tqdm(items, desc=desc, unit=unit, total=total, disable=disable, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def provenance() -> dict:
    """Device, versions and host: every result file carries them."""
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "python": platform.python_version(), "host_devices": jax.device_count()}


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=_plain)
    return path


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def check_positive_ints(owner: str, name: str, values, minimum: int = 1) -> None:
    """Non-empty sequence of ints >= ``minimum``, else a ValueError naming ``owner.name``
    (:func:`selmerge_jax.validation.check_int_sequence`)."""
    check_int_sequence(f"{owner}.{name}", values, minimum)


def check_fractions(owner: str, name: str, values) -> None:
    """Non-empty sequence of numbers in [0, 1] (:func:`selmerge_jax.validation.check_number_sequence`)."""
    check_number_sequence(f"{owner}.{name}", values, 0, 1)
