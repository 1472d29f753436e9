"""Block-sparse flash attention driven by selection plans (reference, XLA and Pallas backends)."""

from selmerge_jax.kernels.block_sparse_attention.api import (
    IMPLEMENTATIONS,
    Implementation,
    block_sparse_attention,
    register_implementation,
)
from selmerge_jax.kernels.block_sparse_attention.plan import (
    SelectionPlan,
    check_plan_inputs,
    dense_causal_plan,
)
from selmerge_jax.kernels.block_sparse_attention.reference import block_sparse_attention_reference

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "SelectionPlan",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "check_plan_inputs",
    "dense_causal_plan",
    "register_implementation",
]

from selmerge_jax.kernels.block_sparse_attention import api as _api

# The Pallas backends are imported here, not inside the first traced call: importing them mid-trace changed
# JAX state that jit's cache key reads, so on a GPU the first call of a jitted MS forward missed its own cache
# entry and compiled twice (tests/test_gpu_model.py).
_api._load_backends()
