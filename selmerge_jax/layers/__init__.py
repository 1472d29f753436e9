"""Floor 4: the one attention front door (``attend``) and the NNX attention layer built on it."""

from selmerge_jax.layers.attention import (
    ATTENTION_KINDS,
    DENSE_KERNELS,
    AttentionSpec,
    attend,
    attended_fraction,
    attended_keys,
    dense_self_attention,
    describe,
    resolve_dense_kernel,
)
from selmerge_jax.layers.ms_attention import AttentionLayerConfig, MSAttention

__all__ = [
    "ATTENTION_KINDS",
    "DENSE_KERNELS",
    "AttentionLayerConfig",
    "AttentionSpec",
    "MSAttention",
    "attend",
    "attended_fraction",
    "attended_keys",
    "dense_self_attention",
    "describe",
    "resolve_dense_kernel",
]
