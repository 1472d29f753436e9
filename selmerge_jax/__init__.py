"""selmerge_jax: select-and-merge attention for million-token contexts in JAX/Flax.

Submodules are imported on demand so ``import selmerge_jax`` stays cheap; the public entry points live in
``selmerge_jax.attention``, ``selmerge_jax.positional``, ``selmerge_jax.models`` and friends.
"""

__version__ = "0.1.0"
