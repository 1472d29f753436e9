"""Rotary position embeddings: frequencies for every scaling rule, exact float32 angles, both layouts.

Frequencies follow Hugging Face ``transformers.modeling_rope_utils`` formula by formula (see ``RopeConfig``).
They are computed in float64 NumPy when everything is static and in float32 ``jnp`` when the length
(dynamic NTK) or the base (CRD NTK) is a traced value, so changing them never recompiles.

Angles: ``pos * inv_freq`` in float32 loses ``ulp(pos)/2`` radians (0.125 rad at 4M), and it loses it
differently at every position, which breaks "q.k depends only on the offset". ``precise=True`` (default)
reduces the phase modulo one turn in fixed point instead: the turns per position are split into a 32-bit
integer part ``hi`` and a float remainder ``lo``, ``pos * hi mod 2^32`` is exact in uint32 arithmetic and the
remainder term is below half a turn, so cos/sin see an argument in [0, 2pi) accurate to ~1e-6 rad at any
position < 2^31. ``precise=False`` is HF's plain float32 product (bit-level parity with HF at long positions).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from selmerge_jax.positional.rope_config import RopeConfig
from selmerge_jax.validation import check_choice, check_int, fail, is_int

__all__ = ["RopeFn", "RotaryPositions", "apply_rope", "inv_freq_from_base", "logn_scale", "make_position_fn",
           "rope_angles", "rope_frequencies"]

_TWO_32 = 2.0**32


def _check_head_dim(head_dim) -> None:
    if not is_int(head_dim) or head_dim <= 2 or head_dim % 2:
        fail("head_dim", head_dim, "an even int > 2 (RoPE rotates pairs)")


def _is_traced(*values) -> bool:
    # Concrete values (Python, NumPy, committed jax.Arrays) take the float64 NumPy path.
    return any(isinstance(v, jax.core.Tracer) for v in values)


def inv_freq_from_base(base, head_dim: int, xp=jnp):
    """``base^(-2i/d)`` for i < d/2; ``base`` may be a traced scalar (float32 then)."""
    _check_head_dim(head_dim)
    dtype = jnp.float32 if xp is jnp else np.float64
    exponent = xp.arange(0, head_dim, 2, dtype=dtype) / head_dim
    return 1.0 / xp.asarray(base, dtype) ** exponent


def _dynamic_multiplier(cfg: RopeConfig, head_dim: int, seq_len):
    """``(factor * L / L0 - (factor - 1))^(d/(d-2))`` with ``L = max(seq_len, L0)``, float32 (traceable)."""
    l0 = cfg.original_max_position_embeddings
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), l0)
    return (cfg.factor * length / l0 - (cfg.factor - 1)) ** (head_dim / (head_dim - 2))


def yarn_attention_factor(cfg: RopeConfig) -> float:
    """YaRN temperature: ``0.1 * mscale * ln(factor) + 1`` (ratio form when mscale and mscale_all_dim)."""
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if cfg.mscale and cfg.mscale_all_dim:
        return float(get_mscale(cfg.factor, cfg.mscale) / get_mscale(cfg.factor, cfg.mscale_all_dim))
    return float(get_mscale(cfg.factor))


def yarn_correction_range(cfg: RopeConfig, head_dim: int, base, xp=np):
    """Dimensions (pair indices) where YaRN's ramp starts and ends: ``(low, high)``."""
    l0 = cfg.original_max_position_embeddings

    def dim_for(rotations):  # the pair index whose wavelength fits `rotations` times into L0
        return head_dim * xp.log(l0 / (rotations * 2 * math.pi)) / (2 * xp.log(base))

    low, high = dim_for(cfg.beta_fast), dim_for(cfg.beta_slow)
    if cfg.truncate:
        low, high = xp.floor(low), xp.ceil(high)
    return xp.maximum(low, 0), xp.minimum(high, head_dim - 1)


def _yarn(cfg: RopeConfig, head_dim: int, base, xp):
    extrapolation = inv_freq_from_base(base, head_dim, xp)
    interpolation = extrapolation / cfg.factor
    low, high = yarn_correction_range(cfg, head_dim, base, xp)
    high = xp.where(low == high, high + 0.001, high)  # HF's guard against a zero-width ramp
    ramp = xp.clip((xp.arange(head_dim // 2) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate (divided by factor)
    return interpolation * (1 - keep) + extrapolation * keep


def _llama3(cfg: RopeConfig, head_dim: int, base, xp):
    inv = inv_freq_from_base(base, head_dim, xp)
    l0, lo_f, hi_f = cfg.original_max_position_embeddings, cfg.low_freq_factor, cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = xp.where(wavelen > l0 / lo_f, inv / cfg.factor, inv)
    smooth = (l0 / wavelen - lo_f) / (hi_f - lo_f)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= l0 / hi_f) & (wavelen <= l0 / lo_f)
    return xp.where(medium, smoothed, scaled)


def rope_frequencies(config: RopeConfig, head_dim: int, *, seq_len=None, theta=None):
    """Inverse frequencies and attention scale of a RoPE config.

    Args:
      config: the rule and its parameters.
      head_dim: H (even).
      seq_len: current length L, used by ``dynamic`` only (HF: ``max(position_ids) + 1``); may be traced.
      theta: override of ``config.theta`` (e.g. a traced CRD NTK base); may be traced.

    Returns:
      ``(inv_freq float32 [H/2], attention_scale)``; ``attention_scale`` multiplies cos and sin (YaRN only,
      1.0 otherwise), so q.k logits scale by its square, as in HF. ``inv_freq`` is a NumPy array (correctly
      rounded from float64) when nothing is traced, so ``apply_rope`` can reduce phases in float64 at trace
      time; HF's float32 ``pow`` lands 1-2 ulp away from it.
    """
    if not isinstance(config, RopeConfig):
        raise TypeError(f"config must be a RopeConfig, got {type(config).__name__}")
    _check_head_dim(head_dim)
    dynamic = config.rope_type == "dynamic" and seq_len is not None
    xp = jnp if dynamic or _is_traced(theta) else np
    base = config.theta if theta is None else theta
    kind = config.rope_type
    if kind == "ntk":
        base = base * config.factor ** (head_dim / (head_dim - 2))
    elif dynamic:
        base = base * _dynamic_multiplier(config, head_dim, seq_len)
    if kind == "yarn":
        inv = _yarn(config, head_dim, base, xp)
    elif kind == "llama3":
        inv = _llama3(config, head_dim, base, xp)
    else:
        inv = inv_freq_from_base(base, head_dim, xp)
        inv = inv / config.factor if kind == "linear" else inv
    scale = yarn_attention_factor(config) if kind == "yarn" else 1.0
    return (np.asarray(inv, np.float32) if xp is np else inv.astype(jnp.float32)), scale


def _top12(x):
    """x with only its 12 leading significand bits (float64 NumPy in, float32 out): products of two such
    values are exact in float32."""
    m, e = np.frexp(np.float64(x))
    return np.float32(np.ldexp(np.trunc(m * 4096.0) / 4096.0, e))


_INV_2PI = 1.0 / (2.0 * math.pi)
_C_HI = _top12(_INV_2PI)
_C_MID = _top12(_INV_2PI - np.float64(_C_HI))
_C_LO = np.float32(_INV_2PI - np.float64(_C_HI) - np.float64(_C_MID))


def _fixed_point(turns):
    """Non-negative float32 turns -> ``(hi uint32, lo float32)``, frac(turns) = (hi + lo) / 2^32 exactly."""
    scaled = (turns - jnp.floor(turns)) * _TWO_32  # the fraction of a float is exact; 2^32 scaling too
    hi = jnp.floor(scaled)
    return hi.astype(jnp.uint32), scaled - hi


def _turns_fixed_point(inv_freq):
    """Turns per position, ``inv_freq / 2pi`` mod 1, as ``(hi uint32, lo float32)`` (see ``_fixed_point``).

    Static frequencies are converted in float64. Traced ones (dynamic/CRD NTK) use an exact float32 split:
    ``inv_freq`` and ``1/2pi`` are cut into 12-bit pieces whose pairwise products are exact, each product is
    turned into fixed point exactly, and only the tiny cross term is rounded (~2^-48 relative).
    """
    if not _is_traced(inv_freq):
        turns = np.asarray(inv_freq, np.float32).astype(np.float64) * _INV_2PI  # the float32 freq, exactly
        scaled = (turns - np.floor(turns)) * _TWO_32
        hi = np.floor(scaled)
        return jnp.asarray(hi.astype(np.uint32)), jnp.asarray((scaled - hi).astype(np.float32))
    a = jnp.abs(inv_freq.astype(jnp.float32))
    a_hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
    a_lo = a - a_hi  # exact: at most 12 significant bits
    small = a_lo * _C_MID + a * _C_LO
    parts = [_fixed_point(t) for t in (a_hi * _C_HI, a_hi * _C_MID, a_lo * _C_HI, small)]
    hi = parts[0][0] + parts[1][0] + parts[2][0] + parts[3][0]  # uint32 sums wrap: still exact mod 1 turn
    lo = parts[0][1] + parts[1][1] + parts[2][1] + parts[3][1]  # < 4 units of 2^-32 turns
    return hi, lo


def rope_angles(positions, inv_freq, *, precise: bool = True):
    """``float32 [..., T, H/2]`` angles ``pos * inv_freq`` (reduced to [0, 2pi) when ``precise``)."""
    positions = jnp.asarray(positions)
    if not precise:
        return positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be integer for precise angles, got {positions.dtype}")
    hi, lo = _turns_fixed_point(inv_freq)
    pos = positions.astype(jnp.int32)[..., None]
    mag = jnp.abs(pos).astype(jnp.uint32)
    whole = (mag * hi).astype(jnp.float32) * (1.0 / _TWO_32)  # uint32 product wraps: exact mod one turn
    part = mag.astype(jnp.float32) * (lo * (1.0 / _TWO_32))  # < 2 turns for |pos| < 2^31: rounding ~1e-7
    phase = whole + part
    phase = phase - jnp.floor(phase)
    return jnp.where(pos < 0, -phase, phase) * (2 * math.pi)


def _check_apply_args(x, positions, inv_freq, layout):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must be [B, T, heads, H], got shape {jnp.shape(x)}")
    b, t, _, h = x.shape
    if h % 2:
        raise ValueError(f"x head dim H={h} must be even for RoPE")
    if jnp.shape(inv_freq) != (h // 2,):
        raise ValueError(f"inv_freq must be [H/2={h // 2}], got shape {jnp.shape(inv_freq)}")
    if jnp.shape(positions) not in ((t,), (b, t)):
        raise ValueError(f"positions must be [T={t}] or [B={b}, T={t}], got shape {jnp.shape(positions)}")
    check_choice("layout", layout, ("half", "interleaved"))


def apply_rope(x, positions, inv_freq, *, layout: str = "half", attention_scale=1.0, precise: bool = True):
    """Rotates x ``[B, T, heads, H]`` by ``positions`` (``int [B, T]`` or ``[T]``).

    Args:
      inv_freq: ``float32 [H/2]`` from ``rope_frequencies`` (static or traced).
      layout: ``"half"``: pair (i, i + H/2) (HF rotate_half); ``"interleaved"``: pair (2i, 2i + 1).
      attention_scale: multiplies cos and sin (YaRN temperature).
      precise: exact phase reduction (see module docstring); False reproduces HF's float32 angles.

    Returns:
      rotated x in x's dtype; the rotation itself runs in float32.
    """
    _check_apply_args(x, positions, inv_freq, layout)
    angles = rope_angles(positions, inv_freq, precise=precise)  # [B|T, ..., H/2]
    angles = jnp.broadcast_to(angles, (x.shape[0], x.shape[1], x.shape[3] // 2))[:, :, None, :]
    cos, sin = jnp.cos(angles) * attention_scale, jnp.sin(angles) * attention_scale
    xf = x.astype(jnp.float32)
    if layout == "half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RotaryPositions:
    """Positions that bring their own (traced) frequencies, e.g. one CRD NTK training step.

    Attributes:
      positions: ``int32 [B, T]`` or ``[T]``.
      inv_freq: ``float32 [H/2]``; replaces the config's frequencies (the config's layout and YaRN
        temperature still apply).
    """

    positions: jax.Array
    inv_freq: jax.Array


@dataclasses.dataclass(frozen=True)
class RopeFn:
    """The ``position_fn`` hook of ``MSAttention``: ``fn(q, k, positions) -> (q, k)`` for a static config.

    ``positions`` is ``int [B, T]`` / ``[T]``, or a ``RotaryPositions`` (``CRDPositions``) whose traced
    frequencies are used instead of the config's. Dynamic NTK recomputes its base from ``max(positions) + 1``
    inside the trace (HF semantics, without HF's "never shrink" cache). ``rotate(x, positions)`` rotates one
    tensor (used for compact positions).
    """

    config: RopeConfig
    head_dim: int
    precise: bool = True

    def __post_init__(self):
        if not isinstance(self.config, RopeConfig):
            raise TypeError(f"config must be a RopeConfig, got {type(self.config).__name__}")
        _check_head_dim(self.head_dim)

    def frequencies(self, positions=None):
        """``(inv_freq, attention_scale)`` for these positions."""
        if isinstance(positions, RotaryPositions):
            scale = yarn_attention_factor(self.config) if self.config.rope_type == "yarn" else 1.0
            return positions.inv_freq, scale
        seq_len = None
        if self.config.rope_type == "dynamic" and positions is not None:
            seq_len = jnp.max(positions) + 1
        return rope_frequencies(self.config, self.head_dim, seq_len=seq_len)

    def rotate(self, x, positions, *, freq_positions=None):
        """Rotates x; ``freq_positions`` (default ``positions``) sets dynamic NTK's current length."""
        inv_freq, scale = self.frequencies(positions if freq_positions is None else freq_positions)
        if isinstance(positions, RotaryPositions):
            positions = positions.positions
        return apply_rope(x, positions, inv_freq, layout=self.config.layout, attention_scale=scale,
                          precise=self.precise)

    def __call__(self, q, k, positions):
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        if self.config.logn_length is None or isinstance(positions, RotaryPositions):
            return q, k  # a CRD training step's positions are cycle-shifted: log-n is an inference rule
        scale = jnp.broadcast_to(logn_scale(positions, self.config.logn_length), q.shape[:2])
        return (q.astype(jnp.float32) * scale[:, :, None, None]).astype(q.dtype), k


def logn_scale(positions, length: int):
    """``float32``, the shape of ``positions``: ``max(1, log(p + 1) / log(length))``, the log-n query
    scale."""
    check_int("length", length, 2)  # the training length
    p = jnp.asarray(positions, jnp.float32)
    return jnp.maximum(1.0, jnp.log1p(p) / math.log(length))


def make_position_fn(config: RopeConfig, head_dim: int, *, precise: bool = True) -> RopeFn:
    """The ``position_fn(q, k, positions) -> (q, k)`` hook for ``MSAttention`` (see ``RopeFn``)."""
    return RopeFn(config, head_dim, precise)
