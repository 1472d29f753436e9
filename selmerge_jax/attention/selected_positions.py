"""Positions only on selected tokens (the paper's pre-training variant): select on un-rotated q/k, then rotate
the gathered set.

Two position schemes for the gathered set of a query group (docs/ARCHITECTURE.md "Position handling"):

* ``"original"``: every gathered token keeps its true index. Rotation then commutes with gathering, so this is
  ``ms_attention(rotated q, rotated k, v, selection_q=q, selection_k=k)``, which is what the layer runs (it
  uses the fast kernels); this module implements it too, as a cross-check of the gather-then-rotate path.
* ``"compact"``: positions are re-indexed inside the gathered, position-sorted set: the ``n`` valid selected
  regions of a group get ``0 .. n*W - 1`` in region order, the group's local block and its queries come last
  (``n*W + t``). Positions never exceed ``top_k * W``, whatever the sequence length. A key gets a different
  position in every group that selects it, so keys cannot be rotated once: each group gathers un-rotated
  K, rotates it with its own positions and attends (pure ``jnp``, ``lax.map`` over groups, float32 softmax).

Groups that still attend densely (few candidates) see every earlier region in order, so both schemes give
them their true positions. ``rotate(x [B', T', heads, H], positions int [B', T']) -> x`` is any RoPE, e.g.
``selmerge_jax.positional.make_position_fn(cfg, H).rotate``.
"""

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.attention.ms import check_self_attention, pad_to_multiple
from selmerge_jax.attention.reference import check_qkv
from selmerge_jax.attention.selection import select_regions
from selmerge_jax.kernels.block_sparse_attention import SelectionPlan
from selmerge_jax.validation import check_choice

__all__ = ["gathered_positions", "ms_attention_selected_positions", "selected_positions_attention"]

PositionScheme = Literal["original", "compact"]
_F32 = jnp.float32


def gathered_positions(regions, valid, group, *, block_size: int, group_tokens: int, scheme: PositionScheme):
    """Positions of one group's gathered tokens.

    Args:
      regions, valid: ``[B, P, M]`` plan row of the group and its validity mask.
      group: the group index (may be traced).

    Returns:
      ``(selected int32 [B, P, M*W], local int32 [B, P, L])``; the group's queries share the local positions.
      Invalid entries get position 0 (they are masked out).
    """
    w, lg = block_size, group_tokens
    offs = jnp.arange(w, dtype=jnp.int32)
    t = jnp.arange(lg, dtype=jnp.int32)
    if scheme == "original":
        sel = regions[..., None] * w + offs
        loc = jnp.broadcast_to(group * lg + t, (*regions.shape[:2], lg))
    else:
        # rank among valid entries by region index (entries are distinct): the position-sorted order
        below = (regions[..., None, :] < regions[..., :, None]) & valid[..., None, :]
        rank = below.sum(-1).astype(jnp.int32)  # [B, P, M]
        sel = rank[..., None] * w + offs
        loc = valid.sum(-1, dtype=jnp.int32)[..., None] * w + t
    sel = jnp.where(valid[..., None], sel, 0)
    return sel.reshape(*regions.shape[:2], -1).astype(jnp.int32), loc.astype(jnp.int32)


def _gather(x_t, head_of_p, regions):
    """x_t ``[B, K, R, W, H]``, regions ``[B, P, M]`` (clipped) -> ``[B, P, M*W, H]``."""
    b, p, m = regions.shape
    out = x_t[jnp.arange(b)[:, None, None], head_of_p[None, :, None], regions]  # [B, P, M, W, H]
    return out.reshape(b, p, m * x_t.shape[3], x_t.shape[4])


def _group_step(q_g, k_t, v_t, k_loc, v_loc, regions, valid, group, *, plan, rotate, scheme, scale):
    """One query group. q_g ``[B, L, N, H]``; k_loc/v_loc ``[B, L, K, H]``. Returns out and lse."""
    b, lg, n, h = q_g.shape
    kv_heads, p, w = k_t.shape[1], regions.shape[1], plan.block_size
    gp = n // p  # query heads per selection head
    head_of_p = jnp.arange(p) // (p // kv_heads)
    safe = jnp.clip(regions, 0, plan.num_regions - 1)
    sel_pos, loc_pos = gathered_positions(regions, valid, group, block_size=w, group_tokens=lg, scheme=scheme)
    loc_k = jnp.moveaxis(k_loc[:, :, head_of_p], 2, 1)  # [B, P, L, H]
    loc_v = jnp.moveaxis(v_loc[:, :, head_of_p], 2, 1)
    keys = jnp.concatenate([_gather(k_t, head_of_p, safe), loc_k], axis=2)  # [B, P, S', H]
    vals = jnp.concatenate([_gather(v_t, head_of_p, safe), loc_v], axis=2).astype(_F32)
    key_pos = jnp.concatenate([sel_pos, loc_pos], axis=2)  # [B, P, S']
    s_len = keys.shape[2]
    keys = rotate(keys.reshape(b * p, s_len, 1, h), key_pos.reshape(b * p, s_len)).reshape(b, p, s_len, h)
    qp = q_g.reshape(b, lg, p, gp, h).transpose(0, 2, 1, 3, 4).reshape(b * p, lg, gp, h)
    qp = rotate(qp, loc_pos.reshape(b * p, lg)).reshape(b, p, lg, gp, h)
    logits = jnp.einsum("bplgh,bpsh->bpgls", qp.astype(_F32), keys.astype(_F32)) * scale
    key_ok = jnp.repeat(valid, w, axis=-1)[:, :, None, None, :]  # [B, P, 1, 1, M*W]
    tri = jnp.tril(jnp.ones((lg, lg), bool)) if plan.causal else jnp.ones((lg, lg), bool)
    mask = jnp.concatenate([jnp.broadcast_to(key_ok, (b, p, 1, lg, key_ok.shape[-1])),
                            jnp.broadcast_to(tri, (b, p, 1, lg, lg))], axis=-1)
    if not plan.include_local:
        mask = mask.at[..., -lg:].set(False)
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    pr = jnp.exp(logits - m)
    den = pr.sum(-1, keepdims=True)
    out = jnp.einsum("bpgls,bpsh->bplgh", pr, vals) / jnp.where(den == 0, 1.0, den).swapaxes(2, 3)
    lse = jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log(den[..., 0]), -jnp.inf)  # [B, P, G', L]
    return out.reshape(b, p, lg, gp, h).transpose(0, 2, 1, 3, 4).reshape(b, lg, n, h), \
        lse.transpose(0, 3, 1, 2).reshape(b, lg, n)


def selected_positions_attention(q, k, v, plan: SelectionPlan, rotate: Callable, *,
                                 scheme: PositionScheme = "compact", scale: float | None = None,
                                 return_lse: bool = False):
    """Block-sparse attention where RoPE is applied after gathering, with per-group positions.

    Args:
      q, k, v: **un-rotated** ``[B, T, N, H]`` / ``[B, T, K, H]``, T a multiple of ``plan.group_tokens``.
      plan: the selection plan (usually from ``select_regions`` on the un-rotated q/k).
      rotate: ``rotate(x [B', T', heads, H], positions int [B', T']) -> x`` (a RoPE).
      scheme: ``"compact"`` or ``"original"`` (see module docstring).
      scale: softmax scale, default ``1/sqrt(H)``.

    Returns:
      ``out [B, T, N, H]`` in q's dtype (and float32 ``lse [B, T, N]`` when asked).
    """
    kv_heads, _ = check_qkv(q, k, v)
    check_choice("scheme", scheme, ("original", "compact"))
    if scheme == "compact" and not plan.causal:
        raise ValueError("compact positions need a causal plan (queries are placed after the gathered keys)")
    if not callable(rotate):
        raise TypeError(f"rotate must be callable (x, positions) -> x, got {type(rotate).__name__}")
    b, t, n, h = q.shape
    if t != plan.num_groups * plan.group_tokens or k.shape[1] != t:
        raise ValueError(f"q/k length {t}/{k.shape[1]} must equal plan groups x merge x W = "
                         f"{plan.num_groups * plan.group_tokens}")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    w, lg, r = plan.block_size, plan.group_tokens, plan.num_regions
    k_t = k.reshape(b, r, w, kv_heads, h).transpose(0, 3, 1, 2, 4)  # [B, K, R, W, H]
    v_t = v.reshape(b, r, w, kv_heads, h).transpose(0, 3, 1, 2, 4)
    split = lambda x: jnp.moveaxis(x.reshape(b, plan.num_groups, lg, *x.shape[2:]), 1, 0)

    def step(args):
        q_g, k_g, v_g, r_g, ok_g, g = args
        return _group_step(q_g, k_t, v_t, k_g, v_g, r_g, ok_g, g, plan=plan, rotate=rotate, scheme=scheme,
                           scale=scale)

    xs = (split(q), split(k), split(v), jnp.moveaxis(plan.kv_regions.astype(jnp.int32), 2, 0),
          jnp.moveaxis(plan.valid_mask(), 2, 0), jnp.arange(plan.num_groups))
    out, lse = jax.lax.map(step, xs)
    out = jnp.moveaxis(out, 0, 1).reshape(b, t, n, h).astype(q.dtype)
    lse = jnp.moveaxis(lse, 0, 1).reshape(b, t, n)
    return (out, lse) if return_lse else out


def ms_attention_selected_positions(q, k, v, config: MSAttentionConfig, rotate: Callable, *,
                                    scheme: PositionScheme = "compact", scale: float | None = None):
    """MS attention with RoPE only on the selected tokens: selection on the un-rotated q/k, then
    ``selected_positions_attention``. Pads like ``ms_attention`` (padding never votes, is never seen)."""
    if config.centroids:
        raise ValueError("centroids are not defined with positions on selected tokens (a centroid has no "
                         "position); set MSAttentionConfig.centroids=False")
    t = check_self_attention(q, k, v, config)
    qp, kp, vp = (pad_to_multiple(x, config.group_tokens) for x in (q, k, v))
    plan = select_regions(qp, kp, config, num_valid_tokens=t)
    return selected_positions_attention(qp, kp, vp, plan, rotate, scheme=scheme, scale=scale)[:, :t]
