"""Select-and-merge attention over a ring: each step computes only the selected blocks of the visiting shard.

Selection needs the whole sequence, but only through region summaries (T/W vectors per head, W times
smaller than K itself), so every device all-gathers the summaries, puts them in global order and builds the
plan rows of *its own* query groups with the same code as single-device ``select_regions``: the rows are
identical. At ring step s the device holds the KV shard of device ``origin``; it keeps the entries of its rows
that fall in that shard, renumbers them to the shard's local regions, compacts them to ``min(M, R_local)``
slots and runs ``block_sparse_attention`` with ``include_local=False`` (step 0, its own shard, adds the causal
local block). A step with no selected block on this device is skipped by ``lax.cond``.

Which layout and strategy win (compute per query group is bounded by ``top_k`` blocks wherever the group is,
so select-and-merge work is already balanced and the zig-zag split buys little):

* ``layout="contiguous"`` lets causal steps whose shard lies after every local query be skipped outright;
  prefer it for select-and-merge. Zig-zag puts a late chunk on every device, which then selects from every
  shard, so no step can be skipped.
* ``strategy="ring"`` keeps KV memory at O(T/n) per device; each step waits for its hop (overlap is left to
  XLA's scheduling of the scan), so it wins when only T/n of KV fits, or when selection touches few shards
  (a skipped step costs a hop and no compute). With the pure-JAX block-sparse op every non-skipped step
  pays for ``min(M, R_local)`` blocks per group whether or not they are valid; the Pallas kernels walk only
  valid blocks, so there the total work equals single-device ``ms_attention``. ``strategy="allgather"``
  gathers K/V once (n x KV memory: 2*T*K*H elements) and has no chain of dependent hops; it wins when KV is
  small (GQA, short T, few devices) or hops are latency-bound (many devices, small shards). Gathering only the
  selected blocks instead of all of K/V does not pay: the union of blocks selected by all heads and groups of
  a shard covers most of every earlier shard once ``P * Q_local * M`` exceeds R_local, which it does at any
  useful size.

Centroids (merged KV) use all-gathered mean-K/mean-V per region (again T/W vectors) and are merged after the
ring. Sequences must be exact multiples of the shard's chunks of ``block_size * merge`` (no internal padding).
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.attention.merging import merge_partials
from selmerge_jax.attention.reference import check_qkv
from selmerge_jax.attention.selection import plan_rows, region_summaries, selection_summaries
from selmerge_jax.kernels.block_sparse_attention import SelectionPlan, block_sparse_attention
from selmerge_jax.sharding.layouts import check_layout, global_index, layout_order, shard_and_local_index
from selmerge_jax.sharding.ring import Strategy, empty_partial, ring_attention, ring_partials

__all__ = ["ring_ms_attention", "sequence_parallel_attention", "shard_plan_rows"]

_F32 = jnp.float32


def _gather_regions(x, axis_name: str, layout: str):
    """Per-region vectors ``[B, R_local, ...]`` of every shard -> ``[B, R, ...]`` in global region order."""
    n = lax.axis_size(axis_name)
    gathered = lax.all_gather(x, axis_name, axis=1, tiled=True) if n > 1 else x
    return gathered[:, np.argsort(layout_order(layout, n, x.shape[1]))]


def _local_groups(num_local_groups: int, axis_name: str, layout: str):
    """``int32 [Q_local]``: global query-group index of each local group."""
    n, me = lax.axis_size(axis_name), lax.axis_index(axis_name)
    return global_index(jnp.arange(num_local_groups, dtype=jnp.int32), me, num_local_groups, layout, n)


def shard_plan_rows(q, k, config: MSAttentionConfig, *, axis_name: str, layout: str = "contiguous"):
    """This shard's rows of the global selection plan: ``int32 [B, P, Q_local, M]`` of global region indices.

    Equal to ``select_regions`` on the unsharded sequence, restricted to this shard's query groups.
    """
    qbar, kbar = selection_summaries(q, k, config)  # [B, R_local, P, H]
    qbar, kbar = (_gather_regions(x, axis_name, layout) for x in (qbar, kbar))
    groups = _local_groups(q.shape[1] // config.group_tokens, axis_name, layout)
    return plan_rows(qbar, kbar, groups, config)


def _step_plan(rows, origin, first: bool, *, config: MSAttentionConfig, layout: str, n: int, regions: int):
    """The rows' entries in ``origin``'s shard, as that shard's local regions, compacted to min(M,
    R_local)."""
    shard, local = shard_and_local_index(rows, regions, layout, n)
    keep = (rows >= 0) & (shard == origin)
    slots = min(rows.shape[-1], regions)
    local = jnp.sort(jnp.where(keep, local, regions), axis=-1)[..., :slots]  # kept entries first
    plan = SelectionPlan(jnp.where(local == regions, -1, local).astype(jnp.int32),
                         block_size=config.block_size,
                         merge=config.merge, causal=config.causal and first, include_local=first)
    return plan, jnp.any(keep)


def _ms_step(first, origin, q, k, v, rows, *, config, layout, axis_name, scale, implementation):
    n = lax.axis_size(axis_name)
    plan, needed = _step_plan(rows, origin, first, config=config, layout=layout, n=n,
                              regions=k.shape[1] // config.block_size)
    attend = partial(block_sparse_attention, plan=plan, scale=scale, return_lse=True,
                     implementation=implementation)
    if first:  # the local block is always there
        return attend(q, k, v)

    return lax.cond(needed, lambda q_, k_, v_: attend(q_, k_, v_), lambda q_, k_, v_: empty_partial(q_), q, k,
                    v)


def _centroid_partial(q, k, v, rows, config: MSAttentionConfig, *, axis_name, layout, scale):
    """Attention of local queries to the centroids of their unselected candidate regions: ``(out, lse)``."""
    b, t, n, h = q.shape
    kv_heads, w, merge = k.shape[2], config.block_size, config.merge
    kc, vc = (_gather_regions(region_summaries(x, w), axis_name, layout) for x in (k, v))  # [B, R, K, H]
    r, p = kc.shape[1], rows.shape[1]
    start = _local_groups(t // config.group_tokens, axis_name, layout)[:, None] * merge
    j = jnp.arange(r)
    cand = j < start if config.causal else (j < start) | (j >= start + merge)  # [Q_local, R]
    hit = jnp.zeros(rows.shape[:3] + (r + 1,), bool)
    bi, pi, qi = (np.arange(d).reshape([-1 if a == i else 1 for a in range(4)]) for i,
                  d in enumerate(rows.shape[:3]))
    hit = hit.at[bi, pi, qi, jnp.where(rows >= 0, rows, r)].set(True)  # -1 -> the spare slot r
    use = jnp.repeat(lax.stop_gradient(cand & ~hit[..., :r]), n // p, axis=1)  # [B, N, Q_local, R]
    qg = q.reshape(b, -1, config.group_tokens, kv_heads, n // kv_heads, h).astype(_F32)
    s = jnp.einsum("bqlkgh,brkh->bkgqlr", qg, kc) * scale + math.log(w)
    ok = use.reshape(b, kv_heads, n // kv_heads, -1, 1, r)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    pr = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = pr.sum(-1, keepdims=True)
    out = jnp.einsum("bkgqlr,brkh->bqlkgh", pr / jnp.where(den == 0, 1.0, den), vc).reshape(b, t, n, h)
    lse = jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(den[..., 0] > 0, den[..., 0], 1.0)),
                    -jnp.inf)
    return out, jnp.moveaxis(lse.reshape(b, kv_heads * (n // kv_heads), t), 1, 2)


def _check(q, k, v, config: MSAttentionConfig, layout: str, selection_q, selection_k):
    check_qkv(q, k, v)
    if not isinstance(config, MSAttentionConfig):
        raise TypeError(f"config must be an MSAttentionConfig, got {type(config).__name__}")
    t = q.shape[1]
    if k.shape[1] != t:
        raise ValueError(f"ring_ms_attention is self-attention: local q length {t} != k length {k.shape[1]}")
    unit = check_layout(layout) * config.group_tokens
    if t % unit:
        raise ValueError(f"local length T_local={t} must be a multiple of {unit} "
                         f"(layout {layout!r} chunks of "
                         f"block_size*merge={config.group_tokens}); pad the sequence before sharding")
    for name, x, ref in (("selection_q", selection_q, q), ("selection_k", selection_k, k)):
        if x is not None and x.shape != ref.shape:
            raise ValueError(f"{name} shape {x.shape} must equal {ref.shape}")


def ring_ms_attention(q, k, v, config: MSAttentionConfig, *, axis_name: str, layout: str = "contiguous",
                      strategy: Strategy = "ring", selection_q=None, selection_k=None,
                      scale: float | None = None,
                      implementation=None, return_rows: bool = False):
    """Select-and-merge attention of the local shard over the whole sequence; call inside ``jax.shard_map``.

    Args:
      q: ``[B, T_local, N, H]``, k/v ``[B, T_local, K, H]``: this device's tokens in ``layout`` order.
      config: the same ``MSAttentionConfig`` as single-device ``ms_attention``; the result equals it.
      axis_name: the mesh axis the sequence is sharded over.
      layout: ``"contiguous"`` (default: lets causal steps be skipped) or ``"zigzag"``.
      strategy: ``"ring"`` (ppermute K/V) or ``"allgather"`` (gather K/V once); see the module docstring.
      selection_q, selection_k: what selection scores, when not q/k (e.g. un-rotated vectors).
      return_rows: also return this shard's plan rows ``int32 [B, P, Q_local, M]`` (global region indices).

    Returns:
      ``[B, T_local, N, H]`` in q's dtype (and the rows).
    """
    _check(q, k, v, config, layout, selection_q, selection_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sq = q if selection_q is None else selection_q
    sk = k if selection_k is None else selection_k
    rows = lax.stop_gradient(shard_plan_rows(sq, sk, config, axis_name=axis_name, layout=layout))
    step_fn = partial(_ms_step, config=config, layout=layout, axis_name=axis_name, scale=scale,
                      implementation=implementation)
    out, lse = ring_partials(step_fn, q, k, v, rows, axis_name=axis_name, strategy=strategy)
    if config.centroids:
        out_c, lse_c = _centroid_partial(q, k, v, rows, config, axis_name=axis_name, layout=layout,
                                         scale=scale)
        out = merge_partials(out.astype(_F32), lse, out_c, lse_c)[0].astype(q.dtype)
    return (out, rows) if return_rows else out


def sequence_parallel_attention(q, k, v, *, axis_name: str, ms_config: MSAttentionConfig | None = None,
                                layout: str = "contiguous", implementation=None):
    """Ring attention on global ``[B, T, ...]`` arrays under the ambient mesh (``with jax.set_mesh(mesh):``).

    The sequence is sharded over ``axis_name`` and the batch over every other mesh axis; ``ms_config=None``
    gives dense causal attention, otherwise select-and-merge. The token order must already be ``layout``'s
    (the natural order for ``"contiguous"``, which is why the model uses it). This is the model's hook.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.axis_names:
        raise ValueError(f"ring attention needs a mesh with axis {axis_name!r}: call the model under "
                         f"`with jax.set_mesh(mesh):` (current mesh axes: {tuple(mesh.axis_names)})")
    batch_axes = tuple(a for a in mesh.axis_names if a != axis_name) or None
    spec = P(batch_axes, axis_name)
    if ms_config is None:
        inner = partial(ring_attention, axis_name=axis_name, layout=layout, implementation=implementation)
    else:
        inner = partial(ring_ms_attention, config=ms_config, axis_name=axis_name, layout=layout,
                        implementation=implementation)
    return jax.shard_map(inner, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
