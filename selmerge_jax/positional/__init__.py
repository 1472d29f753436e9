"""Position encodings for length extension: the RoPE family (HF-compatible scaling rules) and CRD NTK."""

from selmerge_jax.positional.crd_ntk import (
    CRDNTKConfig,
    CRDNTKFn,
    CRDPositions,
    crd_base,
    crd_offsets,
    crd_positions,
    crd_scale,
    crd_step,
)
from selmerge_jax.positional.rope import (
    RopeFn,
    RotaryPositions,
    apply_rope,
    inv_freq_from_base,
    logn_scale,
    make_position_fn,
    rope_angles,
    rope_frequencies,
)
from selmerge_jax.positional.rope_config import ROPE_TYPES, RopeConfig

__all__ = [
    "CRDNTKConfig",
    "CRDNTKFn",
    "CRDPositions",
    "crd_base",
    "crd_offsets",
    "crd_positions",
    "crd_scale",
    "crd_step",
    "ROPE_TYPES",
    "RopeConfig",
    "RopeFn",
    "RotaryPositions",
    "apply_rope",
    "inv_freq_from_base",
    "logn_scale",
    "make_position_fn",
    "rope_angles",
    "rope_frequencies",
]
