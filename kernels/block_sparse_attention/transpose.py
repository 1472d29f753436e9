"""Device-side plan layouts shared by the Pallas kernels: compacted rows and the transposed (CSR) plan.

Kernels never see invalid plan entries. The forward and dQ passes walk a *compacted* row (valid regions first,
ascending, plus a count) so a loop with a dynamic trip count visits exactly the selected blocks. The dK/dV
pass needs the opposite direction, "which query groups read KV region j": the *transposed* plan, built here
with one stable sort and one integer scatter-add, entirely on device (so it works under ``jit`` on traced
plans). All of it is integer work, hence deterministic.
"""

import jax.numpy as jnp

from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan

__all__ = ["compact_plan", "stable_argsort", "transpose_plan", "transpose_plan_steps"]


def compact_plan(plan: SelectionPlan):
    """Valid entries first, ascending: ``(regions int32 [B, P, Q, M], counts int32 [B, P, Q])``.

    Slots past ``counts`` hold ``R`` (one past the last region); kernels never read them.
    """
    valid = plan.valid_mask()
    regions = jnp.where(valid, plan.kv_regions.astype(jnp.int32), plan.num_regions)
    return jnp.sort(regions, axis=-1), valid.sum(-1).astype(jnp.int32)


def stable_argsort(keys, bound: int):
    """``jnp.argsort(keys, axis=-1, stable=True)`` for int keys in ``[0, bound)``.

    When ``bound * n`` fits in int32, key and position are packed into one int32 and sorted alone: XLA:GPU
    then runs one radix sort instead of sorting (key, index) pairs, which is several times slower there.
    """
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
        raise ValueError("stable_argsort: bound must be a positive int (keys lie in "
                         f"[0, bound)), got {bound!r}")
    n = keys.shape[-1]
    if bound * n >= 2**31:
        return jnp.argsort(keys, axis=-1, stable=True)
    packed = keys.astype(jnp.int32) * n + jnp.arange(n, dtype=jnp.int32)
    return jnp.sort(packed, axis=-1) % n


def transpose_plan(plan: SelectionPlan, kv_heads: int):
    """Transposed plan in CSR form, per batch and kv head.

    Returns:
      offsets: ``int32 [B, K, R + 1]``; the entries of KV region ``j`` are ``entries[b, k, offsets[b, k, j]:
        offsets[b, k, j + 1]]``.
      entries: ``int32 [B, K, E]`` with ``E = (P // K) * Q * M``; each entry encodes ``sub * Q + group``,
      where
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
    order = stable_argsort(region, r + 1)  # invalid entries (region R) sort last
    entries = code[order]
    bi = jnp.arange(b)[:, None, None]
    ki = jnp.arange(kv_heads)[None, :, None]
    counts = jnp.zeros((b, kv_heads, r), jnp.int32).at[bi, ki, region].add(1, mode="drop")
    offsets = jnp.concatenate([jnp.zeros((b, kv_heads, 1), jnp.int32), jnp.cumsum(counts, -1)], -1)
    return offsets.astype(jnp.int32), entries


def transpose_plan_steps(plan: SelectionPlan, kv_heads: int):
    """The transposed plan as one flat step list per (batch, kv head), for grid-driven (TPU) dK/dV kernels.

    A Mosaic TPU grid is static, so instead of CSR offsets every (KV region, reader) pair is a grid step,
    sorted by region so that consecutive steps accumulate into the same dK/dV block. Each region also gets one
    *local* step per selection head (its own group reading it causally): that step exists even when
    ``include_local=False`` (it then computes nothing), so every output block is initialised and written.
    Padding steps sort last and repeat the last region (no new DMA, no new output block).

    Returns four ``int32 [B, K, E]`` arrays, ``E = (P // K) * (R + Q * M)``: ``region``, ``group``, ``sub``
    (selection head inside the kv head) and ``kind`` (0 selected, 1 local, 2 padding).
    """
    b, p, q, m = plan.kv_regions.shape
    r, per_kv = plan.num_regions, p // kv_heads
    valid = plan.valid_mask().reshape(b, kv_heads, per_kv, q, m)
    sel_region = jnp.where(valid, plan.kv_regions.reshape(valid.shape).astype(jnp.int32), r)
    sel_group = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32)[:, None], (q, m))
    loc_region = jnp.arange(r, dtype=jnp.int32)
    region = jnp.concatenate([sel_region.reshape(b, kv_heads, per_kv, q * m),
                              jnp.broadcast_to(loc_region, (b, kv_heads, per_kv, r))], -1)
    group = jnp.concatenate([sel_group.reshape(-1), loc_region // plan.merge])
    group = jnp.broadcast_to(group, region.shape)
    sub = jnp.broadcast_to(jnp.arange(per_kv, dtype=jnp.int32)[:, None], region.shape[2:])
    sub = jnp.broadcast_to(sub, region.shape)
    kind = jnp.concatenate([jnp.where(sel_region < r, 0, 2).reshape(b, kv_heads, per_kv, q * m),
                            jnp.ones((b, kv_heads, per_kv, r), jnp.int32)], -1)
    flat = lambda x: x.reshape(b, kv_heads, -1)
    region, group, sub, kind = map(flat, (region, group, sub, kind))
    # Local steps first inside a region: the step that always exists opens the accumulation.
    order = jnp.argsort(region * 3 + (kind != 1), axis=-1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order, axis=-1)
    region, group, sub, kind = map(take, (region, group, sub, kind))
    # Padding repeats the last real step's blocks, so the pipeline issues no new copies for it.
    last = jnp.sum(kind != 2, -1, keepdims=True) - 1
    group, sub = (jnp.where(kind == 2, jnp.take_along_axis(x, last, axis=-1), x) for x in (group, sub))
    region = jnp.minimum(region, r - 1)
    return tuple(x.astype(jnp.int32) for x in (region, group, sub, kind))
