"""Attention: the dense oracle, select-and-merge attention (selection, merging, plans) and the Flax layer."""

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.attention.layer import AttentionLayerConfig, MSAttention
from selmerge_jax.attention.merging import centroid_attention, merge_partials
from selmerge_jax.attention.ms import ms_attention
from selmerge_jax.attention.reference import dense_attention
from selmerge_jax.attention.selection import region_summaries, select_regions
from selmerge_jax.kernels.block_sparse_attention import SelectionPlan, block_sparse_attention

__all__ = [
    "AttentionLayerConfig",
    "MSAttention",
    "MSAttentionConfig",
    "SelectionPlan",
    "block_sparse_attention",
    "centroid_attention",
    "dense_attention",
    "merge_partials",
    "ms_attention",
    "region_summaries",
    "select_regions",
]
