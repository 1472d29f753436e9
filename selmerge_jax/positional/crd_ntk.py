"""CRD NTK: Cyclic, Randomly truncated, Dynamically growing NTK RoPE (the paper's fine-tuning augmentation).

Training step ``t`` (see ../shared/research/paper-msattention.md section 2)::

    s_t    = s0 * growth ** (t // stage_steps)                  # dynamically growing NTK scale (capped)
    base_t = theta * (s_t * C / L0 - (s_t - 1)) ** (d / (d - 2)) # HF dynamic-NTK form at L = max(C, L0)
    pos    = (arange(T) + offset_b) % C                          # cyclic, random start per example

``wrap=False`` is the "truncated" reading: the window is never wrapped, the offset is drawn so that it fits
inside ``[0, C)`` (so C must hold the whole sequence). At inference the rule is a fixed
``base = theta * A ** (d / (d - 2))`` with unwrapped positions (``inference_rope_config``).

Everything that changes between steps (scale, base, offsets) is a traced value, so a jitted train step
compiles once for all stages. ``CRDNTKFn`` is the ``position_fn`` hook: given ``CRDPositions`` it applies the
training rotation, given plain integer positions it applies the inference rule. A model that already holds
a ``RopeFn`` (``make_position_fn``) needs no change: ``CRDPositions`` is a ``RotaryPositions``, whose traced
frequencies ``RopeFn`` uses in place of its config's.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from selmerge_jax.positional.rope import (
    RotaryPositions,
    _check_head_dim,
    apply_rope,
    inv_freq_from_base,
    rope_frequencies,
)
from selmerge_jax.positional.rope_config import RopeConfig
from selmerge_jax.validation import check_number, check_positive_int, check_positive_number

__all__ = ["CRDNTKConfig", "CRDNTKFn", "CRDPositions", "crd_base", "crd_offsets", "crd_positions",
           "crd_scale", "crd_step"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CRDNTKConfig:
    """CRD NTK schedule and cycle (defaults: the authors' draft, Llama-2 at 16K).

    Attributes:
      theta: the model's original RoPE base.
      cycle: C, positions are taken modulo C (draft: 32768).
      original_max_position_embeddings: L0, the pre-training context (Llama-2: 4096).
      initial_scale: s0, NTK scale of the first stage (draft: 16).
      growth: factor between stages (draft: 2); 1 keeps the scale fixed.
      stage_steps: S, training steps per stage (draft: 2000).
      max_scale: optional cap on the scale.
      wrap: True: ``(arange(T) + offset) % C`` with offsets uniform in ``[0, max_offset)``; False: offsets
        uniform in ``[0, C - T]`` so the window fits in ``[0, C)`` unwrapped (requires ``T <= C``).
      max_offset: exclusive bound of the offsets when wrapping (default C: a uniform phase in the cycle).
      inference_scale: A in the inference rule ``theta * A^(d/(d-2))`` (draft sweeps 1024..16384).
      layout: RoPE pair layout, ``"half"`` or ``"interleaved"``.
    """

    theta: float = 10000.0
    cycle: int = 32768
    original_max_position_embeddings: int = 4096
    initial_scale: float = 16.0
    growth: float = 2.0
    stage_steps: int = 2000
    max_scale: float | None = None
    wrap: bool = True
    max_offset: int | None = None
    inference_scale: float = 1024.0
    layout: Literal["half", "interleaved"] = "half"

    def __post_init__(self):
        for name in ("cycle", "original_max_position_embeddings", "stage_steps"):
            check_positive_int(f"CRDNTKConfig.{name}", getattr(self, name))
        for name in ("theta", "initial_scale", "inference_scale"):
            check_positive_number(f"CRDNTKConfig.{name}", getattr(self, name))
        check_number("CRDNTKConfig.growth", self.growth, 1)
        if self.max_scale is not None:
            check_positive_number("CRDNTKConfig.max_scale", self.max_scale)
        if self.max_offset is not None:
            check_positive_int("CRDNTKConfig.max_offset", self.max_offset)
            if not self.wrap:
                raise ValueError("CRDNTKConfig.max_offset only applies with wrap=True (without wrapping the "
                                 "offset range is [0, cycle - T])")
        if not isinstance(self.wrap, bool):
            raise TypeError(f"CRDNTKConfig.wrap must be a bool, got {self.wrap!r}")
        RopeConfig(layout=self.layout)  # validates the layout name

    def inference_rope_config(self) -> RopeConfig:
        """The inference rule as a RopeConfig: fixed NTK base ``theta * A^(d/(d-2))``, positions unwrapped."""
        return RopeConfig(rope_type="ntk", theta=self.theta, factor=self.inference_scale, layout=self.layout)

    def check_seq_len(self, seq_len: int) -> None:
        if not self.wrap and seq_len > self.cycle:
            raise ValueError(f"sequence length {seq_len} exceeds CRDNTKConfig.cycle={self.cycle} with "
                             "wrap=False; set wrap=True or a cycle >= the sequence length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CRDPositions(RotaryPositions):
    """One training step's positions and frequencies (all traced), passed as ``positions`` to the layer or
    to any ``RopeFn`` (it is a ``RotaryPositions``).

    Attributes:
      positions: ``int32 [B, T]`` in ``[0, C)``.
      inv_freq: ``float32 [H/2]`` for this step's base.
      scale: ``float32 []`` NTK scale s_t; base: ``float32 []`` base_t (for logging).
    """

    scale: jax.Array
    base: jax.Array


def crd_scale(config: CRDNTKConfig, step):
    """``float32 []``: ``s0 * growth ** (step // stage_steps)``, capped at ``max_scale`` (step: traced ok)."""
    stage = (jnp.asarray(step, jnp.int32) // config.stage_steps).astype(jnp.float32)
    scale = config.initial_scale * jnp.float32(config.growth) ** stage
    return scale if config.max_scale is None else jnp.minimum(scale, config.max_scale)


def crd_base(config: CRDNTKConfig, scale, head_dim: int):
    """``float32 []``: ``theta * (s * L / L0 - (s - 1)) ** (d / (d - 2))`` with ``L = max(C, L0)``."""
    _check_head_dim(head_dim)
    l0 = config.original_max_position_embeddings
    ratio = max(config.cycle, l0) / l0
    s = jnp.asarray(scale, jnp.float32)
    return config.theta * (s * ratio - (s - 1)) ** (head_dim / (head_dim - 2))


def crd_offsets(config: CRDNTKConfig, key, batch: int, seq_len: int):
    """``int32 [B]`` random start positions (see ``CRDNTKConfig.wrap``)."""
    config.check_seq_len(seq_len)
    high = (config.max_offset or config.cycle) if config.wrap else config.cycle - seq_len + 1
    return jax.random.randint(key, (batch,), 0, high, dtype=jnp.int32)


def crd_positions(config: CRDNTKConfig, offsets, seq_len: int, base_positions=None):
    """``int32 [B, T]``: ``base_positions + offset`` (default ``arange(T)``), modulo C when wrapping; always
    in ``[0, C)``. Packed documents pass their own restarting positions (each in ``[0, T)``), so every
    document of a row starts at the row's offset, exactly as a single document would."""
    config.check_seq_len(seq_len)
    if base_positions is None:
        base_positions = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    elif jnp.shape(base_positions)[-1] != seq_len:
        raise ValueError(f"base_positions must be int [B, T={seq_len}], "
                         f"got shape {jnp.shape(base_positions)}")
    pos = jnp.asarray(base_positions, jnp.int32) + jnp.asarray(offsets, jnp.int32)[:, None]
    return pos % config.cycle if config.wrap else pos


def crd_step(config: CRDNTKConfig, step, key, *, batch: int, seq_len: int, head_dim: int,
             base_positions=None) -> CRDPositions:
    """Positions and frequencies for training step ``step`` (traced) with fresh offsets from ``key``;
    ``base_positions`` ``int [B, T]``: per-document positions of a packed batch (see ``crd_positions``)."""
    scale = crd_scale(config, step)
    base = crd_base(config, scale, head_dim)
    positions = crd_positions(config, crd_offsets(config, key, batch, seq_len), seq_len, base_positions)
    return CRDPositions(positions, inv_freq_from_base(base, head_dim), scale, base)


@dataclasses.dataclass(frozen=True)
class CRDNTKFn:
    """``position_fn(q, k, positions) -> (q, k)`` for CRD NTK.

    ``positions`` is a ``CRDPositions`` during training (its traced frequencies are used) or plain integer
    positions at inference (the fixed-base inference rule, unwrapped).
    """

    config: CRDNTKConfig
    head_dim: int

    def __post_init__(self):
        if not isinstance(self.config, CRDNTKConfig):
            raise TypeError(f"config must be a CRDNTKConfig, got {type(self.config).__name__}")
        _check_head_dim(self.head_dim)

    def _frequencies(self, positions):
        if isinstance(positions, RotaryPositions):
            return positions.positions, positions.inv_freq
        inv_freq, _ = rope_frequencies(self.config.inference_rope_config(), self.head_dim)
        return positions, inv_freq

    def rotate(self, x, positions):
        pos, inv_freq = self._frequencies(positions)
        return apply_rope(x, pos, inv_freq, layout=self.config.layout)

    def __call__(self, q, k, positions):
        return self.rotate(q, positions), self.rotate(k, positions)
