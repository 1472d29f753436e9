"""Selective decode attention's dispatcher: the Pallas Triton kernel on a GPU, the reference elsewhere."""

from __future__ import annotations

import jax

from selmerge_jax.kernels.selective_decode.pallas_triton import selective_decode_triton, tiles
from selmerge_jax.kernels.selective_decode.reference import selective_decode_reference
from selmerge_jax.validation import fail

# "xla": the pure-JAX reference (the block-sparse op's name for its pure-JAX path too)
IMPLEMENTATIONS = ("auto", "xla", "pallas_triton")


def resolve(implementation: str, q_shape: tuple[int, ...], block: int, *,
            name: str = "implementation") -> str:
    """The implementation a call with ``q`` of shape ``[B, K, G, H]`` runs: ``"auto"`` is the Triton kernel on
    a GPU where it tiles the shapes (``pallas_triton.tiles``), else ``"xla"``; others are returned as given.
    ``name``: the argument named by the error for an unknown value."""
    if implementation not in IMPLEMENTATIONS:
        fail(name, implementation, f"one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    return "pallas_triton" if jax.default_backend() == "gpu" and tiles(q_shape, block) else "xla"


def selective_decode(q, k, v, pos, count, blocks, q_pos, *, block: int, scale: float | None = None,
                     implementation: str = "auto"):
    """``(out, lse)`` of selective decode attention (``reference.py`` has the contract) through
    ``resolve(implementation, ...)``: ``"pallas_triton"`` (GPU), ``"xla"`` (the reference, any backend) or
    ``"auto"``."""
    if resolve(implementation, q.shape, block) == "xla":
        return selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=block, scale=scale)
    return selective_decode_triton(q, k, v, pos, count, blocks, q_pos, block=block, scale=scale)
