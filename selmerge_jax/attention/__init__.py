"""Attention: the dense oracle and select-and-merge attention (selection, merging, plans): pure math.

The NNX layer ``MSAttention`` and the front door ``attend`` live one floor up, in ``selmerge_jax.layers``."""

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.attention.merging import centroid_attention, merge_partials
from selmerge_jax.attention.ms import ms_attention
from selmerge_jax.attention.reference import dense_attention
from selmerge_jax.attention.selection import region_summaries, select_regions
from selmerge_jax.kernels.block_sparse_attention import SelectionPlan, block_sparse_attention

__all__ = [
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
