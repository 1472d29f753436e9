"""Sequence layouts over a ring axis: which global tokens each of the ``n`` shards holds.

* ``"contiguous"``: shard i holds tokens ``[i*T/n, (i+1)*T/n)``. Causal attention is unbalanced: shard 0 has
  one block of work, shard n-1 has n.
* ``"zigzag"``: the sequence is cut into ``2n`` chunks and shard i holds chunk ``i`` followed by chunk
  ``2n-1-i`` (ring-flash-attention, Megatron/TransformerEngine, MaxText ``context_parallel_load_balance``).
  Every shard then does the same causal work, and blocks stay contiguous, which block-sparse plans need
  (per-token striping would scatter every region over all shards).

Both layouts keep a shard's tokens in increasing global order, so a causal mask between two tokens of one
shard is the plain lower triangle. ``to_layout`` permutes a global, naturally ordered array so that splitting
its sequence axis evenly over the mesh axis gives each shard its tokens; ``from_layout`` undoes it. Apply them
once at the data layer (tokens and positions), not around every attention call.
"""

from typing import Literal

import jax.numpy as jnp
import numpy as np
from jax import lax

from selmerge_jax.validation import check_choice, check_positive_int

__all__ = [
    "LAYOUTS",
    "Layout",
    "check_layout",
    "chunk_order",
    "from_layout",
    "global_index",
    "layout_order",
    "local_positions",
    "shard_and_local_index",
    "to_layout",
]

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> int:
    """Validates ``layout``; returns the number of contiguous chunks each shard holds (1 or 2)."""
    check_choice("layout", layout, LAYOUTS)
    return 1 if layout == "contiguous" else 2


def chunk_order(layout: str, num_shards: int) -> np.ndarray:
    """Global chunk index of each chunk slot in layout order (shard-major), e.g. zigzag n=2:
    ``[0, 3, 1, 2]``."""
    check_positive_int("num_shards", num_shards)
    if check_layout(layout) == 1:
        return np.arange(num_shards)
    first = np.arange(num_shards)
    return np.stack([first, 2 * num_shards - 1 - first], axis=1).reshape(-1)


def _split(x, layout: str, num_shards: int, axis: int):
    chunks = num_shards * check_layout(layout)
    length = x.shape[axis]
    if length % chunks:
        raise ValueError(f"sequence length {length} (axis {axis}) must be a multiple of {chunks} "
                         f"({layout!r} layout over {num_shards} shards)")
    shape = x.shape[:axis] + (chunks, length // chunks) + x.shape[axis + 1:]
    return x.reshape(shape)


def to_layout(x, layout: str, num_shards: int, axis: int = 1):
    """Natural token order -> layout order along ``axis`` (global array, before sharding)."""
    xs = _split(x, layout, num_shards, axis)
    return jnp.take(xs, chunk_order(layout, num_shards), axis=axis).reshape(x.shape)


def from_layout(x, layout: str, num_shards: int, axis: int = 1):
    """Layout order -> natural token order along ``axis``: the inverse of ``to_layout``."""
    xs = _split(x, layout, num_shards, axis)
    inverse = np.argsort(chunk_order(layout, num_shards))
    return jnp.take(xs, inverse, axis=axis).reshape(x.shape)


def layout_order(layout: str, num_shards: int, units_per_shard: int) -> np.ndarray:
    """Global index of every unit (token, region, group) in layout order:
    ``x_global = x_layout[argsort(order)]``."""
    per_chunk = units_per_shard // check_layout(layout)
    chunks = chunk_order(layout, num_shards)
    slot = np.arange(num_shards * units_per_shard)
    return chunks[slot // per_chunk] * per_chunk + slot % per_chunk


def global_index(local, shard, units_per_shard: int, layout: str, num_shards: int):
    """Global index of local unit ``local`` (token, region or group) on ``shard``; works on traced ints.

    ``units_per_shard`` counts units of the same kind per shard and must split evenly into the shard's chunks.
    """
    per_chunk = units_per_shard // check_layout(layout)
    slot = local // per_chunk  # which of the shard's chunks
    chunk = jnp.where(slot == 0, shard, 2 * num_shards - 1 - shard) if layout == "zigzag" else shard
    return chunk * per_chunk + local % per_chunk


def shard_and_local_index(index, units_per_shard: int, layout: str, num_shards: int):
    """Inverse of ``global_index``: ``(shard, local)`` holding global unit ``index``; works on traced ints."""
    per_chunk = units_per_shard // check_layout(layout)
    chunk, within = index // per_chunk, index % per_chunk
    if layout == "contiguous":
        return chunk, within
    second = chunk >= num_shards
    shard = jnp.where(second, 2 * num_shards - 1 - chunk, chunk)
    return shard, within + jnp.where(second, per_chunk, 0)


def local_positions(local_len: int, *, axis_name: str, layout: str = "zigzag"):
    """``int32 [local_len]``: global positions of this shard's tokens. Call inside ``shard_map`` (e.g.
    RoPE)."""
    n = lax.axis_size(axis_name)
    check_layout(layout)
    if local_len % check_layout(layout):
        raise ValueError(f"local_len={local_len} must be even for the zigzag layout")
    shard = lax.axis_index(axis_name)
    return global_index(jnp.arange(local_len, dtype=jnp.int32), shard, local_len, layout, n).astype(jnp.int32)
