"""Block-sparse flash attention driven by selection plans (reference, XLA and Pallas backends).

Layout (the op anatomy of tokamax): ``api`` (dispatch, registry, which backends are available), ``reference``
(the pure-jnp oracle, the ``"xla"`` implementation), one module per Pallas backend (``pallas_triton``,
``pallas_mosaic_gpu`` with ``pallas_mosaic_gpu_bwd`` and ``pallas_mosaic_gpu_common``, ``pallas_mosaic_tpu``),
``_common`` (what every backend shares), ``plan`` / ``transpose`` (the plan and its device-side layouts) and
``specs`` (named problem shapes for tests and benchmarks). Backends import nothing of ``api``; ``api`` imports
them, once, when this package is imported (below).
"""

from selmerge_jax.kernels.block_sparse_attention.api import (
    IMPLEMENTATIONS,
    Implementation,
    available_implementations,
    block_sparse_attention,
    register_implementation,
    unavailable_implementations,
)
from selmerge_jax.kernels.block_sparse_attention.plan import (
    SelectionPlan,
    check_plan_inputs,
    check_segment_ids,
    dense_causal_plan,
)
from selmerge_jax.kernels.block_sparse_attention.reference import block_sparse_attention_reference

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "SelectionPlan",
    "available_implementations",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "check_plan_inputs",
    "check_segment_ids",
    "dense_causal_plan",
    "register_implementation",
    "unavailable_implementations",
]

from selmerge_jax.kernels.block_sparse_attention import api as _api

# The Pallas backends are imported here, not inside the first traced call: importing them mid-trace changed
# JAX state that jit's cache key reads, so on a GPU the first call of a jitted MS forward missed its own cache
# entry and compiled twice (tests/test_gpu_model.py).
_api._load_backends()
