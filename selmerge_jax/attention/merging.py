"""Merged KV ("centroids"): every unselected candidate region is seen through one mean-K/mean-V token.

The centroid of region j stands for its W tokens, so ``log W`` is added to its logit: if all W keys of the
region were equal to their mean, attending to them one by one would give exactly that weight. The centroid
term is computed as its own softmax (output + log-sum-exp) and merged with the block-sparse part through
``merge_partials``; memory is O(T * R) per head in the forward pass, so centroids suit moderate R (large W).
"""

import math

import jax
import jax.numpy as jnp

from selmerge_jax.attention.selection import region_summaries
from selmerge_jax.kernels.block_sparse_attention import SelectionPlan

__all__ = ["centroid_attention", "merge_partials"]


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merges two softmax partials over disjoint key sets: outs ``[B, T, N, H]``, lses
    ``float32 [B, T, N]``."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)[..., None]
    wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)[..., None]
    out = out_a.astype(jnp.float32) * wa + out_b.astype(jnp.float32) * wb
    return out.astype(out_a.dtype), lse


def _unselected_candidates(plan: SelectionPlan):
    """``bool [B, P, Q, R]``: candidate regions that the plan did not select."""
    r, merge = plan.num_regions, plan.merge
    j = jnp.arange(r)
    start = (jnp.arange(plan.num_groups) * merge)[:, None]
    cand = j < start if plan.causal else (j < start) | (j >= start + merge)
    idx = jnp.where(plan.valid_mask(), plan.kv_regions, r)  # invalid -> out-of-range slot, dropped below
    b, p, q, _ = idx.shape
    hit = jnp.zeros((b, p, q, r + 1), bool)
    hit = hit.at[jnp.arange(b)[:, None, None, None], jnp.arange(p)[None, :, None, None],
                 jnp.arange(q)[None, None, :, None], idx].set(True)
    return cand[None, None] & ~hit[..., :r]


def centroid_attention(q, k, v, plan: SelectionPlan, *, scale: float | None = None, segment_ids=None):
    """Attention of q ``[B, T, N, H]`` to the centroids (mean k ``[H]``, mean v ``[Hv]``) of each group's
    unselected candidate regions.

    With ``segment_ids`` ``int [B, T]`` (packed documents) a centroid never mixes documents: it is the mean of
    the tokens of the region's last segment (``selection.region_summaries``' rule), seen only by queries of
    that segment.

    Returns ``(out [B, T, N, Hv], lse float32 [B, T, N])``; ``lse = -inf`` where a group has no such region.
    """
    b, t, n, h = q.shape
    hv = v.shape[3]
    kv_heads, w = k.shape[2], plan.block_size
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    kc = region_summaries(k, w, segment_ids=segment_ids)  # [B, R, K, H]
    vc = region_summaries(v, w, segment_ids=segment_ids)  # [B, R, K, Hv]
    use = jax.lax.stop_gradient(_unselected_candidates(plan))  # [B, P, Q, R]
    p_heads = use.shape[1]
    use = jnp.repeat(use, n // p_heads, axis=1)  # [B, N, Q, R]
    q_groups = q.reshape(b, plan.num_groups, plan.group_tokens, kv_heads, n // kv_heads, h)
    if segment_ids is None:
        seg_groups = jnp.zeros((plan.num_groups, b, plan.group_tokens), jnp.int32)
        owner = jnp.zeros((b, plan.num_regions), jnp.int32)  # one segment: 0 owns every centroid
    else:
        seg = jnp.asarray(segment_ids, jnp.int32)
        seg_groups = jnp.moveaxis(seg.reshape(b, plan.num_groups, plan.group_tokens), 1, 0)
        owner = seg.reshape(b, plan.num_regions, w).max(-1)  # the segment each centroid belongs to

    def step(args):
        q_g, use_g, seg_g = args  # [B, L, K, G, H], [B, N, R], [B, L]
        s = jnp.einsum("blkgh,brkh->bkglr", q_g.astype(jnp.float32), kc) * scale + math.log(w)
        same = (seg_g[:, :, None] == owner[:, None, :])[:, None, None]  # [B, 1, 1, L, R]
        ok = use_g.reshape(b, kv_heads, -1, 1, plan.num_regions) & same
        s = jnp.where(ok, s, -jnp.inf)
        m = jnp.max(s, -1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        pr = jnp.exp(s - m)
        den = pr.sum(-1, keepdims=True)
        o = jnp.einsum("bkglr,brkh->blkgh", pr / jnp.where(den == 0, 1.0, den), vc)
        lse = jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log(den[..., 0]), -jnp.inf)  # [B, K, G, L]
        return o.reshape(b, -1, n, hv), lse.transpose(0, 3, 1, 2).reshape(b, -1, n)

    out, lse = jax.lax.map(step, (jnp.moveaxis(q_groups, 1, 0), jnp.moveaxis(use, 2, 0), seg_groups))
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n, hv), jnp.moveaxis(lse, 0, 1).reshape(b, t, n)
