"""Select-and-merge attention (MS attention, arXiv 2410.04211): selection -> plan -> block-sparse attention.

Sequences whose length is not a multiple of ``block_size * merge`` are zero-padded at the end internally and
cropped on return. Padding never changes a real query's output: padded tokens come after every real query
(causal), are left out of region summaries, and padded regions never vote in a group's selection. Non-causal
attention would let real queries see the padding, so it requires an exact multiple instead.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.attention.merging import centroid_attention, merge_partials
from selmerge_jax.attention.reference import check_qkv
from selmerge_jax.attention.selection import select_regions
from selmerge_jax.kernels.block_sparse_attention import (
    SelectionPlan,
    block_sparse_attention,
    check_segment_ids,
)

__all__ = ["check_self_attention", "ms_attention", "pad_to_multiple"]


def pad_to_multiple(x, multiple: int, axis: int = 1, mode: str = "constant"):
    """Pads ``axis`` of x up to a multiple of ``multiple``: zeros, or (``mode="edge"``) the last value."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def check_self_attention(q, k, v, config: MSAttentionConfig, *, value_dim: bool = False) -> int:
    """Validates q/k/v for select-and-merge self-attention; returns T. ``value_dim``: v may have its own head
    dim (``check_qkv``)."""
    check_qkv(q, k, v, value_dim=value_dim)
    t = q.shape[1]
    if k.shape[1] != t:
        raise ValueError(f"ms_attention is self-attention: q length {t} != k length {k.shape[1]}")
    if not config.causal and t % config.group_tokens:
        raise ValueError(f"non-causal ms_attention needs T={t} to be a multiple of block_size*merge="
                         f"{config.group_tokens} (padding would be visible)")
    return t


def ms_attention(q, k, v, config: MSAttentionConfig, *, selection_q=None, selection_k=None,
                 scale: float | None = None, implementation: str | Sequence[str] | None = None,
                 return_plan: bool = False, segment_ids=None):
    """Select-and-merge attention of q ``[B, T, N, H]`` over k ``[B, T, K, H]`` and v ``[B, T, K, Hv]``
    (self-attention; v may have a head dim of its own, MLA-style).

    Args:
      config: block size, top-k, merge and the other knobs (see ``MSAttentionConfig``).
      selection_q, selection_k: what selection scores, when it should not be q/k themselves (e.g. the
        un-rotated vectors when positions are applied only to selected tokens). Same shapes as q/k.
      scale: softmax scale, default ``1/sqrt(H)``.
      implementation: block-sparse backend(s) for ``selmerge_jax.kernels.block_sparse_attention``.
      return_plan: also return the ``SelectionPlan`` (for inspection and plots; built on padded length).
      segment_ids: ``int [B, T]`` packed-document ids: selection keeps to regions of the group's documents,
        a query sees only tokens (and centroids of regions) of its own segment. A document that starts at a
        multiple of ``block_size * merge``, with positions restarting there, gets exactly the output it gets
        alone. Backends without a per-token segment mask decline (``"xla"`` takes it).

    Returns:
      ``[B, T, N, Hv]`` in q's dtype (and the plan when asked).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    t = check_self_attention(q, k, v, config, value_dim=True)
    sq = q if selection_q is None else selection_q
    sk = k if selection_k is None else selection_k
    if sq.shape != q.shape or sk.shape != k.shape:
        raise ValueError(f"selection_q/selection_k shapes {sq.shape}/{sk.shape} must equal "
                         f"q/k {q.shape}/{k.shape}")
    mult = config.group_tokens
    qp, kp, vp = (pad_to_multiple(x, mult) for x in (q, k, v))
    seg = None
    if segment_ids is not None:
        check_segment_ids(segment_ids, q)
        seg = pad_to_multiple(jnp.asarray(segment_ids, jnp.int32), mult, mode="edge")  # padding: last id
    plan = select_regions(pad_to_multiple(sq, mult), pad_to_multiple(sk, mult), config, num_valid_tokens=t,
                          segment_ids=seg)
    plan = jax.tree.map(lambda a: checkpoint_name(a, "ms_plan"), plan)  # remat="save" keeps it
    out = _attend(qp, kp, vp, plan, config, scale, implementation, seg)[:, :t]
    return (out, plan) if return_plan else out


def _attend(q, k, v, plan: SelectionPlan, config: MSAttentionConfig, scale, implementation, segment_ids=None):
    if not config.centroids:
        return block_sparse_attention(q, k, v, plan, scale=scale, implementation=implementation,
                                      segment_ids=segment_ids)
    out, lse = block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True,
                                      implementation=implementation, segment_ids=segment_ids)
    out_c, lse_c = centroid_attention(q, k, v, plan, scale=scale, segment_ids=segment_ids)
    return merge_partials(out, lse, out_c, lse_c)[0]
