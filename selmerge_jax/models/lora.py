"""LoRA adapters for the ``Llama`` model: inject, choose what trains, merge/unmerge, save/load adapters alone.

``apply_lora`` swaps the targeted ``nnx.Linear`` projections for ``LoRALinear`` modules that *share* the base
kernel variable, so parameter paths (and therefore HF export names) do not change; the adapters are
``nnx.LoRAParam`` variables, which ``trainable_filter`` selects together with, optionally, the embeddings and
RMSNorm weights (LongLoRA's recipe for long-context fine-tuning, which the select-and-merge paper follows).

Adapter files use PEFT-style tensor names (``base_model.model.<hf module>.lora_A.weight`` ``[r, in]`` and
``lora_B.weight`` ``[out, r]``) plus full tensors for trained embeddings/norms, and an
``adapter_config.json``.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from selmerge_jax.models.hf_import import hf_name, layer_entries
from selmerge_jax.validation import check_positive_int, check_positive_number

__all__ = [
    "TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "adapters_like",
    "apply_lora",
    "load_adapters",
    "merge_lora",
    "save_adapters",
    "trainable_filter",
    "unmerge_lora",
]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Attributes:
      rank: r, the adapter rank.
      alpha: the update is scaled by ``alpha / rank``.
      targets: projection names to adapt (subset of ``TARGETS``).
      train_embeddings: also train the token embedding (and an untied ``lm_head`` if not a LoRA target).
      train_norms: also train every RMSNorm weight.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_embeddings: bool = False
    train_norms: bool = False

    def __post_init__(self):
        check_positive_int("LoRAConfig.rank", self.rank)
        check_positive_number("LoRAConfig.alpha", self.alpha)
        if isinstance(self.targets, str) or not self.targets or set(self.targets) - set(TARGETS):
            raise ValueError(f"LoRAConfig.targets={self.targets!r} must be a non-empty "
                             f"tuple drawn from {TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nnx.Module):
    """``y = x @ W (+ b) + (x @ A) @ B * alpha / r``; ``W`` is the wrapped layer's own kernel variable.

    ``B`` starts at zero, so a freshly adapted model computes exactly what the base model did. The adapters
    are float32 whatever the base's storage dtype (a bf16 7B base keeps f32 adapters and so f32 optimizer
    moments); they are cast to the compute dtype in the matmul. A stacked base kernel ``[L, in, out]`` (the
    model's scanned layers) gets stacked adapters ``[L, in, r]`` / ``[L, r, out]``, one independent adapter
    per layer.
    """

    def __init__(self, base: nnx.Linear, config: LoRAConfig, *, rngs: nnx.Rngs):
        d_in, d_out = base.in_features, base.out_features
        lead = tuple(base.kernel.shape[:-2])  # (L,) for a stacked layer kernel, () otherwise
        self.kernel, self.bias = base.kernel, base.bias
        self.dtype, self.precision = base.dtype, base.precision
        self.scale = config.scale
        self.merged = False
        # A ~ N(0, 1/r) keeps x @ A at the scale of x whatever the rank; B = 0 makes the start an identity.
        a = jax.random.normal(rngs.params(), (*lead, d_in, config.rank), jnp.float32) / np.sqrt(config.rank)
        self.lora_a = nnx.LoRAParam(a)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, config.rank, d_out), jnp.float32))

    def delta(self) -> jax.Array:
        """The dense update ``A @ B * scale`` ``[..., in, out]`` (float32)."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return jnp.matmul(a, b) * self.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = jnp.dot(x, self.kernel[...].astype(dtype), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        term = self.adapter_term(x)
        return y if term is None else y + term

    def adapter_term(self, x: jax.Array) -> jax.Array | None:
        """``(x @ A) @ B * scale`` in the compute dtype, None once merged into the kernel."""
        if self.merged:
            return None
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        low = jnp.dot(x, self.lora_a[...].astype(dtype), precision=self.precision)
        return jnp.dot(low, self.lora_b[...].astype(dtype), precision=self.precision) * self.scale


def _lora_modules(model: nnx.Module):
    """``(path, LoRALinear)`` pairs in graph order."""
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)]


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Wraps every targeted ``nnx.Linear`` of ``model`` in a ``LoRALinear`` (in place; returns ``model``)."""
    if _lora_modules(model):
        raise ValueError("model already has LoRA adapters")
    parents = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]
    count = 0
    for parent in parents:
        for name in config.targets:
            child = getattr(parent, name, None)
            if isinstance(child, nnx.Linear):
                setattr(parent, name, LoRALinear(child, config, rngs=rngs))
                count += 1
    if not count:
        raise ValueError(f"no nnx.Linear named {config.targets} found in {type(model).__name__}")
    return model


def adapters_like(model: nnx.Module, source: nnx.Module) -> nnx.Module:
    """``model`` (in place; returned) given adapters where ``source`` has them: same targets, rank and scale,
    and the same merged flags, so ``source``'s state fits ``model``'s structure. A ``source`` without
    adapters leaves ``model`` unchanged."""
    found = _lora_modules(source)
    if not found:
        return model
    first = found[0][1]
    rank = int(first.lora_a.shape[-1])
    targets = tuple(t for t in TARGETS if any(path[-1] == t for path, _ in found))
    apply_lora(model, LoRAConfig(rank=rank, alpha=first.scale * rank, targets=targets), rngs=nnx.Rngs(0))
    merged = {path: m.merged for path, m in found}
    for path, module in _lora_modules(model):
        module.merged = merged.get(path, False)
    return model


def _is_norm(path, _value) -> bool:
    return any(p in _NORMS for p in path)


def _is_embedding(path, _value) -> bool:
    return "embed_tokens" in path or "lm_head" in path


def trainable_filter(config: LoRAConfig):
    """The NNX filter of trainable variables: adapters, plus embeddings/norms when the config says so.

    Use it as ``nnx.Optimizer(model, tx, wrt=trainable_filter(cfg))`` / ``nnx.DiffState(0, filter)``.
    """
    parts = [nnx.LoRAParam]
    if config.train_embeddings:
        # An adapted lm_head keeps its frozen base kernel: only its adapter trains.
        parts.append(nnx.All(nnx.Param, _is_embedding, nnx.Not(_lora_base("lm_head", config))))
    if config.train_norms:
        parts.append(nnx.All(nnx.Param, _is_norm))
    return nnx.Any(*parts)


def _lora_base(name: str, config: LoRAConfig):
    targeted = name in config.targets
    return lambda path, _value: targeted and name in path


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (``W += A @ B * scale``); the adapters are kept but
    skipped."""
    for _, module in _lora_modules(model):
        if not module.merged:
            merged = module.kernel[...].astype(jnp.float32) + module.delta()
            module.kernel[...] = merged.astype(module.kernel.dtype)
            module.merged = True
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Inverse of ``merge_lora`` (exact up to float rounding of the add/subtract)."""
    for _, module in _lora_modules(model):
        if module.merged:
            unmerged = module.kernel[...].astype(jnp.float32) - module.delta()
            module.kernel[...] = unmerged.astype(module.kernel.dtype)
            module.merged = False
    return model


def _adapter_tensors(model: nnx.Module, config: LoRAConfig) -> dict[str, tuple[tuple, int | None, bool]]:
    """``{file tensor name: (state path, layer index or None, transpose?)}`` of everything an adapter file
    holds.

    Files name one tensor per layer (PEFT's ``model.layers.{i}...``) while the model stores layers stacked.
    """
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    out = {}
    for path, _ in _lora_modules(model):
        for leaf, suffix in (("lora_a", ".lora_A.weight"), ("lora_b", ".lora_B.weight")):
            stored = (*path, leaf)
            for layer_path, index in layer_entries(stored, flat[stored].shape):
                base = _PREFIX + hf_name((*layer_path[:-1], "kernel"))[0].removesuffix(".weight")
                out[base + suffix] = (stored, index, True)
    extra = nnx.state(model, nnx.All(nnx.Not(nnx.LoRAParam), trainable_filter(config)))
    for path in traverse_util.flatten_dict(nnx.to_pure_dict(extra)):
        for layer_path, index in layer_entries(path, flat[path].shape):
            name, transpose = hf_name(layer_path)
            out[_PREFIX + name] = (path, index, transpose)
    return out


def _transposed(array, transpose: bool):
    return np.swapaxes(array, -1, -2) if transpose and array.ndim >= 2 else array


def save_adapters(model: nnx.Module, config: LoRAConfig, path: str) -> None:
    """Writes only the trained tensors (adapters, and embeddings/norms if trained) plus the adapter config."""
    if any(m.merged for _, m in _lora_modules(model)):
        raise ValueError("adapters are merged into the base weights; call "
                         "unmerge_lora(model) before saving them")
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    tensors = {}
    for name, (p, index, transpose) in _adapter_tensors(model, config).items():
        array = np.asarray(jax.device_get(flat[p] if index is None else flat[p][index]))
        tensors[name] = np.ascontiguousarray(_transposed(array, transpose))
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, _WEIGHTS), metadata={"format": "pt"})
    meta = {"peft_type": "LORA", "r": config.rank, "lora_alpha": config.alpha,
            "target_modules": list(config.targets), "train_embeddings": config.train_embeddings,
            "train_norms": config.train_norms}
    with open(os.path.join(path, _CONFIG), "w") as f:
        json.dump(meta, f, indent=2)


def load_adapters(model: nnx.Module, path: str) -> LoRAConfig:
    """Loads adapters saved by ``save_adapters`` into ``model`` (applying LoRA first if it has none).

    Returns the adapter's ``LoRAConfig``. Missing or unexpected tensors and shape mismatches raise ValueError.
    """
    with open(os.path.join(path, _CONFIG)) as f:
        meta = json.load(f)
    config = LoRAConfig(rank=meta["r"], alpha=meta["lora_alpha"], targets=tuple(meta["target_modules"]),
                        train_embeddings=meta["train_embeddings"], train_norms=meta["train_norms"])
    if not _lora_modules(model):
        apply_lora(model, config, rngs=nnx.Rngs(0))
    expected = _adapter_tensors(model, config)
    tensors = load_file(os.path.join(path, _WEIGHTS))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter file does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    state = nnx.state(model)
    stored = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    flat = {p: np.array(jax.device_get(stored[p])) for p in {p for p, _, _ in expected.values()}}
    for name, (p, index, transpose) in expected.items():
        dest = flat[p] if index is None else flat[p][index]
        array = _transposed(tensors[name], transpose)
        if array.shape != dest.shape:
            raise ValueError(f"adapter tensor {name!r} has shape {array.shape}, model expects {dest.shape}")
        dest[...] = array.astype(dest.dtype)
    stored.update({p: jnp.asarray(v) for p, v in flat.items()})
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(stored))
    nnx.update(model, state)
    return config
