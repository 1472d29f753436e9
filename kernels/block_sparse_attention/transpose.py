"""Device-side plan layouts shared by the Pallas kernels: compacted rows and the transposed (CSR) plan.

Kernels never see invalid plan entries. The forward and dQ passes walk a *compacted* row (valid regions first,
ascending, plus a count) so a loop with a dynamic trip count visits exactly the selected blocks. The dK/dV pass
needs the opposite direction, "which query groups read KV region j": the *transposed* plan, built here with one
stable sort and one integer scatter-add, entirely on device (so it works under ``jit`` on traced plans).
All of it is integer work, hence deterministic.
"""

import jax.numpy as jnp

from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan

__all__ = ["compact_plan", "transpose_plan"]


def compact_plan(plan: SelectionPlan):
    """Valid entries first, ascending: ``(regions int32 [B, P, Q, M], counts int32 [B, P, Q])``.

    Slots past ``counts`` hold ``R`` (one past the last region); kernels never read them.
    """
    valid = plan.valid_mask()
    regions = jnp.where(valid, plan.kv_regions.astype(jnp.int32), plan.num_regions)
    return jnp.sort(regions, axis=-1), valid.sum(-1).astype(jnp.int32)


def transpose_plan(plan: SelectionPlan, kv_heads: int):
    """Transposed plan in CSR form, per batch and kv head.

    Returns:
      offsets: ``int32 [B, K, R + 1]``; the entries of KV region ``j`` are ``entries[b, k, offsets[j]:
        offsets[j+1]]``.
      entries: ``int32 [B, K, E]`` with ``E = (P // K) * Q * M``; each entry encodes ``sub * Q + group``, where
        ``sub`` is the selection head inside kv head ``k`` (always 0 when ``P == K``) and ``group`` the query
        group that selected region ``j``. Entries past ``offsets[R]`` are padding.
    """
    b, p, q, m = plan.kv_regions.shape
    r, per_kv = plan.num_regions, p // kv_heads
    valid = plan.valid_mask()
    region = jnp.where(valid, plan.kv_regions.astype(jnp.int32), r).reshape(b, kv_heads, per_kv * q * m)
    code = (jnp.arange(per_kv, dtype=jnp.int32)[:, None, None] * q
            + jnp.arange(q, dtype=jnp.int32)[None, :, None])
    code = jnp.broadcast_to(code, (per_kv, q, m)).reshape(-1)
    order = jnp.argsort(region, axis=-1, stable=True)  # invalid entries (region R) sort last
    entries = code[order]
    bi = jnp.arange(b)[:, None, None]
    ki = jnp.arange(kv_heads)[None, :, None]
    counts = jnp.zeros((b, kv_heads, r), jnp.int32).at[bi, ki, region].add(1, mode="drop")
    offsets = jnp.concatenate([jnp.zeros((b, kv_heads, 1), jnp.int32), jnp.cumsum(counts, -1)], -1)
    return offsets.astype(jnp.int32), entries
