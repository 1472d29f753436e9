"""Selective decode attention's dispatcher: the Pallas Triton kernel on a GPU, the reference elsewhere."""

from __future__ import annotations

import jax

from selmerge_jax.kernels.selective_decode.pallas_triton import selective_decode_triton, tiles
from selmerge_jax.kernels.selective_decode.reference import selective_decode_reference
from selmerge_jax.validation import fail

IMPLEMENTATIONS = ("auto", "jnp", "pallas_triton")


def selective_decode(q, k, v, pos, count, blocks, q_pos, *, block: int, scale: float | None = None,
                     implementation: str = "auto"):
    """``(out, lse)`` of selective decode attention. ``implementation``: ``"pallas_triton"`` (GPU),
    ``"jnp"`` (the reference, any backend), ``"auto"``: the Triton kernel on a GPU for the shapes it tiles,
    else the reference."""
    if implementation not in IMPLEMENTATIONS:
        fail("implementation", implementation, f"one of {IMPLEMENTATIONS}")
    if implementation == "jnp" or (implementation == "auto" and jax.default_backend() != "gpu"):
        return selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=block, scale=scale)
    if implementation == "auto" and not tiles(q, block):
        return selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=block, scale=scale)
    return selective_decode_triton(q, k, v, pos, count, blocks, q_pos, block=block, scale=scale)
