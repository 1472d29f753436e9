"""Selective decode attention's dispatcher: the Pallas Triton kernel on a GPU, the reference elsewhere."""

from __future__ import annotations

from selmerge_jax.kernels import target
from selmerge_jax.kernels.selective_decode.pallas_triton import centroid_tile, selective_decode_triton, tiles
from selmerge_jax.kernels.selective_decode.reference import selective_decode_reference
from selmerge_jax.validation import fail

# "xla": the pure-JAX reference (the block-sparse op's name for its pure-JAX path too)
IMPLEMENTATIONS = ("auto", "xla", "pallas_triton")


def resolve(implementation: str, q_shape: tuple[int, ...], block: int, *,
            name: str = "implementation", centroid_rows: int | None = None) -> str:
    """The implementation a call with ``q`` of shape ``[B, K, G, H]`` runs: ``"auto"`` is the Triton kernel on
    a GPU where it tiles the shapes (``pallas_triton.tiles``, and ``centroid_tile`` for a store of
    ``centroid_rows`` centroids), else ``"xla"``; others are returned as given. ``name``: the argument named
    by the error for an unknown value."""
    if implementation not in IMPLEMENTATIONS:
        fail(name, implementation, f"one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    ok = tiles(q_shape, block) and (centroid_rows is None or centroid_tile(centroid_rows) > 0)
    return "pallas_triton" if target.platform() == "gpu" and ok else "xla"


def selective_decode(q, k, v, pos, count, blocks, q_pos, *, block: int, scale: float | None = None,
                     centroids=None, implementation: str = "auto"):
    """``(out, lse)`` of selective decode attention (``reference.py`` has the contract; ``centroids``: the
    other blocks' merged tokens in the same softmax) through ``resolve(implementation, ...)``:
    ``"pallas_triton"`` (GPU), ``"xla"`` (the reference, any backend) or ``"auto"``."""
    rows = None if centroids is None else centroids[0].shape[2]
    kw = dict(block=block, scale=scale, centroids=centroids)
    if resolve(implementation, q.shape, block, centroid_rows=rows) == "xla":
        return selective_decode_reference(q, k, v, pos, count, blocks, q_pos, **kw)
    return selective_decode_triton(q, k, v, pos, count, blocks, q_pos, **kw)
