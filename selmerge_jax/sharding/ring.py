"""Ring attention over a named mesh axis, to be called inside ``jax.shard_map``.

Each device holds a shard of the sequence (``layouts.py`` says which tokens). Over ``n`` steps the local
queries meet every KV shard: step 0 uses the device's own K/V, then K and V (stacked into one array, so one
collective per step) move one hop along the ring with ``lax.ppermute``, n-1 hops in all. Steps 1..n-1 are one
``lax.scan`` body, so compile time does not grow with the ring size. Every step yields a partial
``(out, lse)`` and the partials are merged with the float32 online-softmax rule of ``merge_partials``.

Gradients use a custom VJP that keeps only q, k, v, out and lse (no per-step residuals): the backward pass
rotates K/V again, recomputes each step's partial, and sends the dK/dV accumulators around the ring with
them; one last hop brings every shard's dK/dV home. With ``strategy="allgather"`` K/V are all-gathered once
instead (n x the KV memory, one collective, no serial dependence between steps; dK/dV come back through
``psum_scatter``): MaxText's default context-parallel strategy.

The per-step work runs on ``block_sparse_attention`` (Pallas on GPU/TPU, pure JAX elsewhere), driven by a
dense plan here and by the selection plan in ``ring_ms.py``. Steps that need no work are skipped with
``lax.cond``: with the contiguous layout a causal step whose KV shard lies after the queries; with zig-zag
every off-diagonal step is exactly half a block (ring-flash-attention's split) and nothing is masked.
"""

import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from selmerge_jax.attention.merging import merge_partials
from selmerge_jax.attention.reference import check_qkv, dense_attention
from selmerge_jax.kernels import target
from selmerge_jax.kernels.block_sparse_attention import (
    SelectionPlan,
    block_sparse_attention,
    dense_causal_plan,
)
from selmerge_jax.sharding.layouts import check_layout
from selmerge_jax.validation import check_choice, check_positive_int

__all__ = ["Strategy", "empty_partial", "ring_attention", "ring_partials"]

Strategy = Literal["ring", "allgather"]
_F32 = jnp.float32

# step_fn(first, origin, q, k, v, aux) -> (out [B, T, N, H], lse float32 [B, T, N]): the partial of the local
# queries over the KV shard that started on device `origin` (traced); `first` (static) marks the own shard.
StepFn = Callable[..., tuple[jax.Array, jax.Array]]


def _shift(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


def _check_strategy(strategy: str) -> None:
    check_choice("strategy", strategy, ("ring", "allgather"))


def ring_partials(step_fn: StepFn, q, k, v, aux=None, *, axis_name: str, strategy: Strategy = "ring"):
    """Merges ``step_fn``'s partials over all KV shards of ``axis_name``; returns ``(out, lse float32)``.

    ``aux`` is an integer pytree passed unchanged to ``step_fn`` (no gradient), e.g. selection plan rows.
    """
    _check_strategy(strategy)
    if lax.axis_size(axis_name) == 1:  # no ring: the step's own VJP (the kernel's) beats recomputing it
        return step_fn(True, lax.axis_index(axis_name), q, k, v, aux)
    return _ring(step_fn, axis_name, strategy, q, k, v, aux)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(step_fn, axis_name, strategy, q, k, v, aux):
    return _ring_fwd(step_fn, axis_name, strategy, q, k, v, aux)[0]


def _fetch(kv, gathered, origin, axis_name: str):
    """The visiting KV shard: one ring hop (ring) or a slice of the gathered K/V (allgather)."""
    if gathered is None:
        return lax.ppermute(kv, axis_name, _shift(lax.axis_size(axis_name)))
    return gathered[origin]


def _ring_fwd(step_fn, axis_name, strategy, q, k, v, aux):
    n, me = lax.axis_size(axis_name), lax.axis_index(axis_name)
    kv = jnp.stack([k, v])
    gathered = lax.all_gather(kv, axis_name) if strategy == "allgather" and n > 1 else None
    out, lse = step_fn(True, me, q, k, v, aux)
    out = out.astype(_F32)

    def body(carry, step):  # steps 1..n-1 share one body: compile time does not grow with n
        kv, out, lse = carry
        origin = (me - step) % n
        kv = _fetch(kv, gathered, origin, axis_name)
        out_s, lse_s = step_fn(False, origin, q, kv[0], kv[1], aux)
        out, lse = merge_partials(out, lse, out_s.astype(_F32), lse_s)
        return (kv, out, lse), None

    if n > 1:
        (_, out, lse), _ = lax.scan(body, (kv, out, lse), jnp.arange(1, n))
    out = out.astype(q.dtype)
    return (out, lse), (q, k, v, aux, out, lse)


def _step_cotangents(out_s, lse_s, out, lse, d_out, d_lse):
    """Cotangents of one partial from those of the merged result: out = sum_s exp(lse_s - lse) * out_s."""
    finite = jnp.isfinite(lse_s) & jnp.isfinite(lse)
    w = jnp.where(finite, jnp.exp(lse_s - jnp.where(finite, lse, 0.0)), 0.0)
    d_out32 = d_out.astype(_F32)
    ct_out = (w[..., None] * d_out32).astype(out_s.dtype)
    ct_lse = w * (jnp.sum(d_out32 * (out_s.astype(_F32) - out.astype(_F32)), -1) + d_lse)
    return ct_out, ct_lse


def _step_grads(step_fn, first, origin, q, kv, aux, res_out, res_lse, d_out, d_lse):
    """Recomputes one step's partial and pulls the merged result's cotangents back to ``(dq, dkv)``."""
    f = lambda q_, k_, v_: step_fn(first, origin, q_, k_, v_, aux)
    (out_s, lse_s), pull = jax.vjp(f, q, kv[0], kv[1])
    dq, dk, dv = pull(_step_cotangents(out_s, lse_s, res_out, res_lse, d_out, d_lse))
    return dq.astype(_F32), jnp.stack([dk, dv]).astype(_F32)


def _ring_bwd(step_fn, axis_name, strategy, res, cts):
    q, k, v, aux, out, lse = res
    n, me = lax.axis_size(axis_name), lax.axis_index(axis_name)
    grads = partial(_step_grads, step_fn, res_out=out, res_lse=lse, d_out=cts[0], d_lse=cts[1])
    kv = jnp.stack([k, v])
    gathered = lax.all_gather(kv, axis_name) if strategy == "allgather" and n > 1 else None
    dq, dkv = grads(True, me, q, kv, aux)
    if gathered is not None:  # one dK/dV slot per source shard, reduce-scattered home at the end
        dkv = jnp.zeros_like(dkv, shape=(n,) + dkv.shape).at[me].set(dkv)  # *_like: keeps the varying axes

    def body(carry, step):
        kv, dq, dkv = carry
        origin = (me - step) % n
        kv = _fetch(kv, gathered, origin, axis_name)
        if gathered is None:
            # the accumulator travels with the K/V it belongs to
            dkv = lax.ppermute(dkv, axis_name, _shift(n))
        dq_s, dkv_s = grads(False, origin, q, kv, aux)
        dkv = dkv + dkv_s if gathered is None else dkv.at[origin].add(dkv_s)
        return (kv, dq + dq_s, dkv), None

    if n > 1:
        (_, dq, dkv), _ = lax.scan(body, (kv, dq, dkv), jnp.arange(1, n))
        if gathered is None:  # device i now holds shard i+1's dK/dV: one hop home
            dkv = lax.ppermute(dkv, axis_name, _shift(n))
        else:
            dkv = lax.psum_scatter(dkv, axis_name, scatter_dimension=0)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------------- dense ring


def _full_plan(batch: int, heads: int, num_groups: int, block_size: int) -> SelectionPlan:
    """Non-causal plan that selects every other region (local block included): full attention."""
    others = np.array([[j for j in range(num_groups) if j != g] or [-1] for g in range(num_groups)], np.int32)
    regions = jnp.broadcast_to(jnp.asarray(others), (batch, heads, num_groups, others.shape[1]))
    return SelectionPlan(regions, block_size=block_size, merge=1, causal=False)


def _attend(q, k, v, *, causal: bool, block_size: int, scale, implementation):
    """One block of dense attention with equal q and kv lengths, as ``(out, lse)``."""
    if implementation == "dense":
        return dense_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    b, t, _, _ = q.shape
    w = math.gcd(t, block_size)
    heads = k.shape[2]
    if causal:
        plan = dense_causal_plan(b, heads, t, w)
    else:
        plan = _full_plan(b, heads, t // w, w)
    return block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True, implementation=implementation)


def empty_partial(q):
    """The partial of a step with nothing to attend: zero output, ``lse = -inf``.

    ``*_like`` keeps q's varying mesh axes, which check_vma requires of both lax.cond branches.
    """
    return jnp.zeros_like(q), jnp.full_like(q[..., 0], -jnp.inf, dtype=_F32)


def _fold_halves(x):
    """``[B, 2c, ...] -> [2B, c, ...]``: two half-length problems as one batch (kernels need T == S)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, 2, t // 2, *x.shape[2:]), 1, 0).reshape(2 * b, t // 2, *x.shape[2:])


def _unfold_halves(x):
    b2, c = x.shape[:2]
    return jnp.moveaxis(x.reshape(2, b2 // 2, c, *x.shape[2:]), 0, 1).reshape(b2 // 2, 2 * c, *x.shape[2:])


def _zigzag_before(q, k, v, attend):
    """KV shard from an earlier device: both query chunks see its first chunk, neither its second."""
    half = k.shape[1] // 2
    k1, v1 = (jnp.concatenate([x[:, :half]] * 2, axis=0) for x in (k, v))
    out, lse = attend(_fold_halves(q), k1, v1)
    return _unfold_halves(out), _unfold_halves(lse)


def _zigzag_after(q, k, v, attend):
    """KV shard from a later device: only the second query chunk sees it, and sees all of it."""
    half = q.shape[1] // 2
    q2 = jnp.concatenate([q[:, half:]] * 2, axis=0)
    out, lse = attend(q2, _fold_halves(k), _fold_halves(v))
    b = q.shape[0]
    out, lse = merge_partials(out[:b].astype(_F32), lse[:b], out[b:].astype(_F32), lse[b:])
    out = jnp.concatenate([jnp.zeros_like(out), out], axis=1).astype(q.dtype)
    return out, jnp.concatenate([jnp.full_like(lse, -jnp.inf), lse], axis=1)


def _dense_step(first, origin, q, k, v, aux, *, causal, layout, axis_name, attend):
    del aux
    if first or not causal:
        return attend(q, k, v, causal=causal and first)
    me = lax.axis_index(axis_name)
    full = partial(attend, causal=False)
    if layout == "zigzag":
        return lax.cond(origin < me, partial(_zigzag_before, attend=full),
                        partial(_zigzag_after, attend=full), q, k, v)
    return lax.cond(origin < me, full, lambda q_, k_, v_: empty_partial(q_), q, k, v)


def ring_attention(q, k, v, *, axis_name: str, causal: bool = True, layout: str = "zigzag",
                   strategy: Strategy = "ring", block_size: int = 128, scale: float | None = None,
                   implementation=None, return_lse: bool = False):
    """Dense attention of the local shard's queries over the whole sequence; call inside ``jax.shard_map``.

    Args:
      q: ``[B, T_local, N, H]``, k/v: ``[B, T_local, K, H]``: this device's tokens, in ``layout`` order
        (``layouts.to_layout`` before sharding, ``from_layout`` on the output).
      axis_name: the mesh axis the sequence is sharded over; other mesh axes (data, fsdp, heads) compose.
      causal: causal attention over global positions.
      layout: ``"zigzag"`` (balanced causal work; T_local must be even) or ``"contiguous"``.
      strategy: ``"ring"`` (ppermute K/V, O(T/n) KV memory) or ``"allgather"`` (gather K/V once).
      block_size: tile of the block-sparse op that runs each step (reduced to a divisor of the block length).
      implementation: what runs each step: ``"dense"`` (the einsum oracle: T_local^2 logits per step, fastest
        to compile; the CPU default) or backend name(s) of ``block_sparse_attention`` (default elsewhere:
        the Pallas kernels with dense plans, flash-style memory).
      return_lse: also return the float32 log-sum-exp ``[B, T_local, N]``.

    Returns:
      ``[B, T_local, N, H]`` in q's dtype (and the lse), equal to the unsharded ``dense_attention``.
    """
    check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError("ring_attention needs equal local q and kv lengths, got "
                         f"{q.shape[1]} and {k.shape[1]}")
    if q.shape[1] % check_layout(layout):
        raise ValueError(f"layout='zigzag' needs an even local length, got T_local={q.shape[1]}")
    check_positive_int("block_size", block_size)
    _check_strategy(strategy)
    if implementation is None and target.platform() == "cpu":
        implementation = "dense"
    attend = partial(_attend, block_size=block_size, scale=scale, implementation=implementation)
    step_fn = partial(_dense_step, causal=causal, layout=layout, axis_name=axis_name, attend=attend)
    out, lse = ring_partials(step_fn, q, k, v, axis_name=axis_name, strategy=strategy)
    return (out, lse) if return_lse else out
