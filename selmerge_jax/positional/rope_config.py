"""``RopeConfig``: which RoPE scaling rule, with Hugging Face's field names, validated on construction.

The rules and their field names mirror the ``rope_scaling`` dicts in Hugging Face ``config.json`` files so
imported checkpoints keep their exact frequencies:

========  ======================================================================================
default   ``inv_freq_i = theta^(-2i/d)``
linear    position interpolation: ``inv_freq / factor``
ntk       fixed NTK-aware base: ``theta * factor^(d/(d-2))`` (the CRD NTK inference rule; HF has no such
          type, so ``to_hf`` writes it as a default RoPE with the scaled ``rope_theta``)
dynamic   NTK base recomputed from the current length L: ``theta * (factor*L/L0 - (factor-1))^(d/(d-2))``
          with ``L = max(L, L0)``, ``L0 = original_max_position_embeddings`` (HF: ``max_position_embeddings``)
yarn      ramp between interpolation and extrapolation over frequency bands + attention temperature
llama3    Llama-3.1 frequency-band scaling (low band / factor, high band kept, smooth ramp between)
========  ======================================================================================
"""

import dataclasses
import math
from typing import Any, Literal, cast

from selmerge_jax.validation import check_choice, check_int, check_number, check_positive_int

__all__ = ["RopeConfig", "RopeType", "RopeLayout", "ROPE_TYPES"]

RopeType = Literal["default", "linear", "ntk", "dynamic", "yarn", "llama3"]
RopeLayout = Literal["half", "interleaved"]
ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")
_NEEDS_L0 = ("dynamic", "yarn", "llama3")
# Keys of an HF rope_scaling dict that this config understands, per type ("type"/"rope_type" always).
_HF_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}


def _positive(name: str, value, *, allow_none: bool = False):
    check_number(f"RopeConfig.{name}", value, 0, math.inf, low_open=True, high_open=True,
                 allow_none=allow_none)  # positive and finite


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding and its length-extension rule.

    Attributes:
      rope_type: one of ``ROPE_TYPES`` (see module docstring).
      theta: base wavelength (HF ``rope_theta``).
      factor: scale factor of linear/ntk/dynamic/yarn/llama3 (1.0 means no scaling).
      original_max_position_embeddings: L0, the pre-training context (dynamic, yarn, llama3).
      beta_fast, beta_slow: YaRN ramp bounds in rotations (HF defaults 32 and 1).
      attention_factor: YaRN temperature on cos/sin; None derives it from factor (and mscale/mscale_all_dim).
      mscale, mscale_all_dim: DeepSeek-style YaRN temperature parameters (HF names).
      truncate: YaRN rounds the correction range to whole dimensions (HF default True).
      low_freq_factor, high_freq_factor: Llama-3 band edges (HF defaults in Llama-3.1: 1 and 4).
      layout: ``"half"`` (rotate_half: pairs (i, i + H/2), Llama/HF checkpoints) or ``"interleaved"``
        (pairs (2i, 2i+1), GPT-J / original Meta checkpoints).
      logn_length: L of log-n attention, an inference rule on top of any type: a query at position p is scaled
        by ``max(1, log(p + 1) / log(L))`` (Qwen-7B's ``use_logn_attn``), so that the attention entropy of a
        context longer than the training length L stays near its trained level instead of spreading over the
        extra keys. None: off. Hugging Face RoPE has no such field (``to_hf`` refuses it).
    """

    rope_type: RopeType = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    layout: RopeLayout = "half"
    logn_length: int | None = None

    def __post_init__(self):
        check_choice("RopeConfig.rope_type", self.rope_type, ROPE_TYPES)
        check_choice("RopeConfig.layout", self.layout, ("half", "interleaved"))
        for name in ("theta", "factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
            _positive(name, getattr(self, name))
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            _positive(name, getattr(self, name), allow_none=True)
        l0 = self.original_max_position_embeddings
        check_positive_int("RopeConfig.original_max_position_embeddings", l0, allow_none=True)
        if self.rope_type in _NEEDS_L0 and l0 is None:
            raise ValueError(f"RopeConfig(rope_type={self.rope_type!r}) needs "
                             "original_max_position_embeddings")
        if self.rope_type == "yarn" and self.beta_fast < self.beta_slow:
            raise ValueError(f"RopeConfig.beta_fast={self.beta_fast} must be >= beta_slow={self.beta_slow}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"RopeConfig.high_freq_factor={self.high_freq_factor} must be > "
                             f"low_freq_factor={self.low_freq_factor}")
        check_int("RopeConfig.logn_length", self.logn_length, 2, allow_none=True)  # the training length
        if not isinstance(self.truncate, bool):
            raise TypeError(f"RopeConfig.truncate must be a bool, got {self.truncate!r}")

    @classmethod
    def from_hf(cls, config: dict[str, Any], *, layout: RopeLayout = "half") -> "RopeConfig":
        """Builds the config from a Hugging Face ``config.json`` dict (``rope_theta`` + ``rope_scaling``).

        Reads ``rope_scaling`` (or the newer ``rope_parameters``) with its ``rope_type`` or legacy ``type``.
        Like HF, dynamic NTK measures lengths against ``max_position_embeddings`` and YaRN/llama3 fall back to
        it when ``original_max_position_embeddings`` is missing. Unsupported features raise ValueError.
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        theta = scaling.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        partial = scaling.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial!r} is not supported (only full-head RoPE)")
        if rope_type not in _HF_KEYS:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                             f"supported: {sorted(_HF_KEYS)}")
        unknown = set(scaling) - _HF_KEYS[rope_type]
        if unknown:
            raise ValueError(f"rope_scaling keys {sorted(unknown)} are not understood for type {rope_type!r}")
        max_pos = config.get("max_position_embeddings")
        kw = {k: v for k, v in scaling.items() if v is not None}
        if rope_type == "dynamic":  # HF's dynamic NTK uses max_position_embeddings as L0
            kw["original_max_position_embeddings"] = max_pos
        elif rope_type in _NEEDS_L0:
            kw.setdefault("original_max_position_embeddings", max_pos)
        if rope_type == "yarn" and "factor" not in kw:  # HF: factor defaults to the context ratio
            kw["factor"] = max_pos / kw["original_max_position_embeddings"]
        return cls(rope_type=cast(RopeType, rope_type), theta=float(theta), layout=layout, **kw)

    def to_hf(self, head_dim: int | None = None) -> dict[str, Any]:
        """The HF config fields for this RoPE: ``rope_theta``, ``rope_scaling`` (None for default RoPE), and
        ``max_position_embeddings`` for dynamic NTK (HF reads L0 from there). ``ntk`` becomes a default RoPE
        with the scaled theta (which depends on ``head_dim``), giving HF the same frequencies."""
        if self.logn_length is not None:
            raise ValueError(f"RopeConfig.logn_length={self.logn_length}: log-n query scaling has no Hugging "
                             "Face form; refusing to export it silently dropped (to export the weights "
                             "without it, set rope.logn_length=None explicitly: it is an inference rule)")
        if self.rope_type == "default":
            return {"rope_theta": self.theta, "rope_scaling": None}
        if self.rope_type == "ntk":
            if head_dim is None:
                raise ValueError("RopeConfig.to_hf(head_dim=...) is required for rope_type='ntk'")
            return {"rope_theta": self.ntk_base(head_dim), "rope_scaling": None}
        scaling: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        out: dict[str, Any] = {"rope_theta": self.theta, "rope_scaling": scaling}
        if self.rope_type == "dynamic":
            out["max_position_embeddings"] = self.original_max_position_embeddings
            return out
        if self.rope_type in _NEEDS_L0:
            scaling["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "yarn":
            scaling.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            for name in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, name) is not None:
                    scaling[name] = getattr(self, name)
        if self.rope_type == "llama3":
            scaling.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        return out

    def ntk_base(self, head_dim: int) -> float:
        """Fixed NTK-aware base ``theta * factor^(d/(d-2))`` (d = head_dim)."""
        if not isinstance(head_dim, int) or head_dim <= 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int > 2, got {head_dim!r}")
        return self.theta * self.factor ** (head_dim / (head_dim - 2))
