"""Hugging Face checkpoints <-> ``Llama``: local ``config.json`` + ``*.safetensors`` (single or sharded)
directories.

Only local directories are read or written (no hub access). The NNX parameter tree mirrors HF's module names
(see ``llama.py``), so a tensor's HF name is its NNX path with a fixed leaf rename; matrices are transposed
(torch ``[out, in]`` vs NNX ``[in, out]``). The model stores its decoder layers stacked (``('layers', ...)``
paths with a leading ``[L]`` axis); HF files hold one tensor per layer (``model.layers.{i}...``), so layer
variables are split on export and stacked on import (``layer_entries``). Tensors are cast to the config's
``param_dtype`` on import and to a chosen dtype on export; exporting in the dtype it was imported in gives
back the same bytes.
"""

import json
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.llama import Llama
from selmerge_jax.positional import RopeConfig
from selmerge_jax.validation import check_choice, check_positive_int

__all__ = ["SUPPORTED", "config_from_hf", "config_to_hf", "hf_name", "layer_entries", "load_hf",
           "params_to_hf",
           "save_hf"]

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Buffers older transformers versions saved alongside the weights; they are recomputed from the config.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_LEAF_RENAME = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a parsed HF ``config.json`` (Llama/Mistral); ``overrides`` replace fields.

    Raises ValueError for unsupported architectures or features (non-SiLU activations, MLP biases).
    """
    arch = _architecture(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with SiLU only)")
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by this Llama implementation")
    heads = hf["num_attention_heads"]
    fields = {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
        "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "ffn_dim": hf["intermediate_size"], "head_dim": hf.get("head_dim"),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "rope": RopeConfig.from_hf(hf),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "sliding_window": hf.get("sliding_window") if SUPPORTED[arch] == "mistral" else None,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "bos_token_id": hf.get("bos_token_id"), "eos_token_id": _eos(hf.get("eos_token_id")),
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in SUPPORTED]
    if not known:
        by_type = {v: k for k, v in SUPPORTED.items()}.get(hf.get("model_type"))
        if by_type is None:
            raise ValueError(f"unsupported architecture: architectures={archs!r}, model_type="
                             f"{hf.get('model_type')!r}; supported: {sorted(SUPPORTED)}")
        return by_type
    return known[0]


def _eos(value):
    return tuple(value) if isinstance(value, list) else value


def config_to_hf(config: ModelConfig, *, dtype: str | None = None) -> dict:
    """The HF ``config.json`` dict for ``config`` (Mistral when it has a sliding window, Llama otherwise).

    Raises ValueError for what a Hugging Face Llama cannot express, rather than dropping it: log-n query
    scaling (``rope.logn_length``), the interleaved RoPE layout, and select-and-merge RoPE on the selected
    tokens only (``ms.position_mode``). Select-and-merge attention itself is not part of the file: the weights
    are those of a Llama, which ``transformers`` runs with dense attention.
    """
    _check_hf_positions(config)
    arch = "MistralForCausalLM" if config.sliding_window else "LlamaForCausalLM"
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    hf = {
        "architectures": [arch], "model_type": SUPPORTED[arch], "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_size, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": config.attention_bias,
        "mlp_bias": False, "initializer_range": config.init_std, "bos_token_id": config.bos_token_id,
        "eos_token_id": eos, "torch_dtype": dtype or config.param_dtype,
    }
    if arch == "MistralForCausalLM":
        hf["sliding_window"] = config.sliding_window
    hf.update(config.rope.to_hf(config.head_size))
    return hf


def _check_hf_positions(config: ModelConfig) -> None:
    """Position rules without a Hugging Face form (``config_to_hf``)."""
    if config.rope.layout != "half":
        raise ValueError(f"ModelConfig.rope.layout={config.rope.layout!r}: has no Hugging Face Llama form "
                         "(transformers rotates half-split pairs); refusing to export rather than write "
                         "weights whose positions transformers would read differently")
    mode = config.ms.position_mode
    if config.attention in ("ms", "ring_ms") and mode != "before_selection":
        raise ValueError(f"ModelConfig.ms.position_mode={mode!r}: has no Hugging Face form (RoPE on the "
                         "selected tokens only; transformers rotates every token at its true position); "
                         "refusing to export. allowed: 'before_selection'")


def hf_name(path: tuple) -> tuple[str, bool]:
    """``(HF tensor name, transpose?)`` of an NNX parameter path such as ``('layers', 0, 'mlp', 'up_proj',
    'kernel')`` -> ``('model.layers.0.mlp.up_proj.weight', True)``."""
    *prefix, leaf = (str(p) for p in path)
    if leaf not in _LEAF_RENAME:
        raise ValueError(f"parameter path {path!r} has no Hugging Face name (leaf {leaf!r})")
    name = ".".join([*prefix, _LEAF_RENAME[leaf]])
    return (name if prefix[0] == "lm_head" else "model." + name), leaf == "kernel"


def _base_params(model: nnx.Module) -> dict:
    """Flat ``{path: array}`` of the base weights (LoRA adapters are not part of an HF checkpoint)."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return traverse_util.flatten_dict(nnx.to_pure_dict(state))


def layer_entries(path: tuple, shape: tuple) -> list[tuple[tuple, int | None]]:
    """``[(per-layer path, index into the stored array or None)]`` of one stored variable.

    A stacked layer variable ``('layers', *rest)`` of shape ``[L, ...]`` is L per-layer entries
    ``('layers', i, *rest)``; anything else is itself, unindexed.
    """
    if path[0] != "layers":
        return [(path, None)]
    return [(("layers", i, *path[1:]), i) for i in range(shape[0])]


def _tensor_index(path: str) -> dict[str, str]:
    """``{tensor name: file}`` for a single-file or sharded safetensors checkpoint directory."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, _SINGLE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path!r} (found {sorted(os.listdir(path))}); "
                                "only safetensors checkpoints are supported")
    with safe_open(single, "np") as f:
        return {name: single for name in f.keys()}


def _check_names(expected: Iterable[str], present: Iterable[str], tied: bool) -> None:
    expected, present = set(expected), set(present)
    ignorable = {n for n in present if n.endswith(_IGNORABLE_SUFFIXES) or (tied and n == "lm_head.weight")}
    missing, unexpected = sorted(expected - present), sorted(present - expected - ignorable)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: {len(missing)} missing tensors "
                         f"{missing[:8]}, {len(unexpected)} unexpected tensors {unexpected[:8]}")


def load_hf(path: str, **overrides) -> Llama:
    """Loads a local HF Llama/Mistral directory into a new ``Llama`` (no random init is ever materialised).

    ``overrides`` replace ``ModelConfig`` fields (e.g. ``param_dtype="bfloat16"``, ``attention="ms"``).
    Tensors are cast to ``param_dtype``. Missing/unexpected tensors and wrong shapes raise ValueError.
    """
    with open(os.path.join(path, "config.json")) as f:
        config = config_from_hf(json.load(f), **overrides)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    abstract = _base_params(model)
    targets = {}  # HF name -> (stored path, layer index or None, transpose)
    for p, value in abstract.items():
        for layer_path, index in layer_entries(p, value.shape):
            name, transpose = hf_name(layer_path)
            targets[name] = (p, index, transpose)
    files = _tensor_index(path)
    _check_names(targets, files, config.tie_embeddings)
    buffers = {p: np.empty(v.shape, v.dtype) for p, v in abstract.items()}
    for file in sorted(set(files.values())):
        with safe_open(file, "np") as f:
            for name in f.keys():
                if name in targets:
                    p, index, transpose = targets[name]
                    dest = buffers[p] if index is None else buffers[p][index]
                    dest[...] = _to_param(f.get_tensor(name), name, dest, transpose)
    state = nnx.state(model, nnx.Param)
    loaded = {p: jnp.asarray(b) for p, b in buffers.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(loaded))
    nnx.update(model, state)
    return model


def _to_param(array: np.ndarray, name: str, target: np.ndarray, transpose: bool) -> np.ndarray:
    if transpose:
        array = array.T
    if array.shape != target.shape:
        raise ValueError(f"tensor {name!r} has shape {array.shape} (after transpose), "
                         f"expected {target.shape}")
    return array.astype(target.dtype)


def params_to_hf(model: nnx.Module, dtype: str | None = None) -> dict[str, np.ndarray]:
    """``{HF name: numpy array}`` of the model's base weights, cast to ``dtype`` (default: as stored)."""
    _check_no_unmerged_lora(model)
    out = {}
    for path, value in _base_params(model).items():
        stored = np.asarray(jax.device_get(value))
        for layer_path, index in layer_entries(path, stored.shape):
            name, transpose = hf_name(layer_path)
            array = stored if index is None else stored[index]
            array = array.T if transpose else array
            out[name] = np.ascontiguousarray(array.astype(_NP_DTYPES[dtype]) if dtype else array)
    return out


def _check_no_unmerged_lora(model: nnx.Module) -> None:
    for path, node in nnx.iter_graph(model):
        if getattr(node, "merged", True) is False:
            raise ValueError(f"module at {'.'.join(map(str, path))} has unmerged LoRA adapters: call "
                             "lora.merge_lora(model) before exporting, or lora.save_adapters for the "
                             "adapters")


def save_hf(model: Llama, path: str, *, dtype: str | None = None, max_shard_bytes: int | None = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).

    The RoPE rule written is ``model.config.rope``: give the model its inference rule first (a CRD NTK
    fine-tune's fixed base, ``evaluation.common.load_model`` does it; ``selmerge-export`` exports that way).
    What has no HF form is refused before anything is written (``config_to_hf``).

    Args:
      dtype: tensor dtype on disk (``float32``/``bfloat16``/``float16``); default: the parameter dtype.
      max_shard_bytes: split into shards of at most this many bytes (a tensor is never split).
    """
    if dtype is not None:
        check_choice("dtype", dtype, _NP_DTYPES)
    hf_config = config_to_hf(model.config, dtype=dtype)  # refuses what HF cannot express before writing
    tensors = params_to_hf(model, dtype)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, _SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump(index, f, indent=2)


def _shard(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    check_positive_int("max_shard_bytes", max_bytes, allow_none=True)
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards
