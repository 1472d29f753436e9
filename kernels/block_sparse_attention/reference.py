"""Pure-jnp block-sparse attention driven by a selection plan: the oracle every kernel is tested against.

Memory is O(T * attended tokens), never O(T * S): a ``lax.map`` walks the query groups, and each step gathers
only the group's selected regions plus its local block. Scores, softmax and accumulation are float32 whatever
the input dtype; outputs are cast back to q's dtype.
"""

import math

import jax
import jax.numpy as jnp

from selmerge_jax.kernels.block_sparse_attention.plan import (
    SelectionPlan,
    check_plan_inputs,
    check_segment_ids,
)

__all__ = ["block_sparse_attention_reference"]

_F32 = jnp.float32


def _gather_regions(x_t, head_idx, regions):
    """x_t ``[B, K, R, W, H]`` (or ``Hv``), regions ``[B, P, M]`` (clipped) -> ``[B, P, M, W, H]``."""
    b = jnp.arange(x_t.shape[0])[:, None, None]
    return x_t[b, head_idx[None, :, None], regions]


def _group_step(q_g, k_t, v_t, regions, valid, g, seg_t, *, plan, kv_heads, scale):
    """Attention for query group ``g``. q_g ``[B, L, N, H]`` with L = merge*W tokens; seg_t ``[B, R, W]``
    segment ids or None."""
    b, l, n, h = q_g.shape  # noqa: E741 (L: the group's tokens, as in the docstring)
    hv = v_t.shape[-1]
    w, m, p = plan.block_size, plan.max_selected, regions.shape[1]
    gq = n // kv_heads
    head_idx = jnp.arange(p) // (p // kv_heads)  # selection head -> kv head
    qh = q_g.reshape(b, l, kv_heads, gq, h).transpose(0, 2, 3, 1, 4).astype(_F32)  # [B, K, G, L, H]
    ks = _gather_regions(k_t, head_idx, jnp.clip(regions, 0, plan.num_regions - 1))  # [B, P, M, W, H]
    vs = _gather_regions(v_t, head_idx, jnp.clip(regions, 0, plan.num_regions - 1))
    gp = p // kv_heads  # 1 when selection is per kv head, G when per query head
    key_ok = jnp.repeat(valid, w, axis=-1).reshape(b, kv_heads, gp, 1, m * w)
    ks = ks.reshape(b, kv_heads, gp, m * w, h).astype(_F32)
    vs = jnp.where(key_ok[..., 0, :, None], vs.reshape(b, kv_heads, gp, m * w, hv).astype(_F32), 0.0)
    sel_ok = key_ok
    if seg_t is not None:  # packed documents: a query sees only keys of its own segment
        seg_q = jax.lax.dynamic_slice_in_dim(seg_t.reshape(b, -1), g * l, l, axis=1)  # [B, L]
        seg_sel = seg_t[jnp.arange(b)[:, None, None], jnp.clip(regions, 0, plan.num_regions - 1)]  # [B,P,M,W]
        seg_sel = seg_sel.reshape(b, kv_heads, gp, 1, m * w)
        sel_ok = key_ok & (seg_sel == seg_q[:, None, None, :, None])
    s_sel = jnp.where(sel_ok, jnp.matmul(qh, jnp.swapaxes(ks, -1, -2)) * scale, -jnp.inf)  # [B, K, G, L, M*W]
    logits, values = [s_sel], [jnp.broadcast_to(vs, (b, kv_heads, gq, m * w, hv))]
    if plan.include_local:
        start = g * l
        kl = jax.lax.dynamic_slice_in_dim(k_t.reshape(b, kv_heads, -1, h), start, l, axis=2).astype(_F32)
        vl = jax.lax.dynamic_slice_in_dim(v_t.reshape(b, kv_heads, -1, hv), start, l, axis=2).astype(_F32)
        s_loc = jnp.einsum("bkgth,bksh->bkgts", qh, kl) * scale  # [B, K, G, L, L]
        if plan.causal:
            tri = jnp.tril(jnp.ones((l, l), bool))
            s_loc = jnp.where(tri, s_loc, -jnp.inf)
        if seg_t is not None:
            same = seg_q[:, :, None] == seg_q[:, None, :]  # [B, L, L]: the local block is the group itself
            s_loc = jnp.where(same[:, None, None], s_loc, -jnp.inf)
        logits.append(s_loc)
        values.append(jnp.broadcast_to(vl[:, :, None], (b, kv_heads, gq, l, hv)))
    s = jnp.concatenate(logits, -1)
    vals = jnp.concatenate(values, -2)
    m_row = jnp.max(s, -1, keepdims=True)
    m_row = jnp.where(jnp.isfinite(m_row), m_row, 0.0)  # empty rows: keep exp() finite, output 0
    pr = jnp.exp(s - m_row)
    denom = pr.sum(-1, keepdims=True)
    out = jnp.matmul(pr, vals) / jnp.where(denom == 0, 1.0, denom)  # [B, K, G, L, Hv]
    lse = jnp.where(denom[..., 0] > 0, m_row[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)  # [B, K, G, L]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, l, n, hv)
    return out, lse.transpose(0, 3, 1, 2).reshape(b, l, n)


def block_sparse_attention_reference(q, k, v, plan: SelectionPlan, *, scale: float | None = None,
                                     return_lse: bool = False, segment_ids=None):
    """Block-sparse attention of q ``[B, T, N, H]`` over k ``[B, S=T, K, H]``, v ``[B, S, K, Hv]`` as the plan
    says.

    Args:
      q, k, v: query/key/value, GQA allowed (N a multiple of K); v's head dim may differ from q/k's (MLA).
      plan: the selection plan (see ``plan.py`` for the exact semantics).
      scale: softmax scale, default ``1/sqrt(H)``.
      return_lse: also return the float32 log-sum-exp ``[B, T, N]`` of each query's logits (``-inf`` for a
        query that attends to nothing), so partial results can be merged (centroids, ring steps).
      segment_ids: ``int [B, T]`` packed-document ids: a query sees only keys of its own segment.

    Returns:
      ``out [B, T, N, Hv]`` in q's dtype (and ``lse`` when asked). A query with nothing to attend outputs 0.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    kv_heads, _ = check_plan_inputs(q, k, v, plan, value_dim=True)
    check_segment_ids(segment_ids, q)
    b, t, n, h = q.shape
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    w, l = plan.block_size, plan.group_tokens  # noqa: E741
    k_t = k.reshape(b, plan.num_regions, w, kv_heads, h).transpose(0, 3, 1, 2, 4)  # [B, K, R, W, H]
    v_t = v.reshape(b, plan.num_regions, w, kv_heads, v.shape[3]).transpose(0, 3, 1, 2, 4)
    q_groups = jnp.moveaxis(q.reshape(b, plan.num_groups, l, n, h), 1, 0)  # [Q, B, L, N, H]
    regions = jnp.moveaxis(plan.kv_regions.astype(jnp.int32), 2, 0)  # [Q, B, P, M]
    valid = jnp.moveaxis(plan.valid_mask(), 2, 0)
    seg_t = None if segment_ids is None else jnp.asarray(segment_ids).reshape(b, plan.num_regions, w)

    def step(args):
        q_g, r_g, ok_g, g = args
        return _group_step(q_g, k_t, v_t, r_g, ok_g, g, seg_t, plan=plan, kv_heads=kv_heads, scale=scale)

    out, lse = jax.lax.map(step, (q_groups, regions, valid, jnp.arange(plan.num_groups)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, t, n, v.shape[3]).astype(q.dtype)
    lse = jnp.moveaxis(lse, 0, 1).reshape(b, t, n)
    return (out, lse) if return_lse else out
