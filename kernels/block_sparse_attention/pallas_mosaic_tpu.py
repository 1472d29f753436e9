"""Block-sparse flash attention for TPU (Pallas Mosaic TPU): plan indices scalar-prefetched into the index
maps.

Splash-attention style: the compacted plan lives in SMEM (scalar prefetch) and the K/V ``BlockSpec`` index
maps read it, so the pipeline DMAs exactly the selected regions. Steps past a row's count repeat its last
region (no new copy) and compute nothing.

* forward / dQ: grid ``(B, P, Q, M + merge)``; one query tile is a whole query group (``merge * W`` tokens x
  ``N // P`` heads, all sharing the plan row); the last axis walks the selected regions, then the group's own
  ``merge`` regions with the causal mask.
* dK/dV: grid ``(B, K, E)`` over the transposed plan as a flat step list (``transpose.transpose_plan_steps``),
  sorted by region so consecutive steps accumulate into one dK/dV block that is written on its last step.
Layouts are head-major (``[B, heads, T, H]``, transposed once in XLA) so blocks end in ``(tokens, H)`` tiles.
Statistics are float32; the saved LSE is natural-log, ``-inf`` for a query that attends to nothing.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from selmerge_jax.kernels.block_sparse_attention._common import (
    F32,
    NEG_BIG,
    backward_row_terms,
    decline_dtype,
    decline_platform,
    named_residuals,
)
from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan, check_plan_inputs
from selmerge_jax.kernels.block_sparse_attention.transpose import compact_plan, transpose_plan_steps

__all__ = ["block_sparse_attention_mosaic_tpu"]


@dataclasses.dataclass(frozen=True)
class _Static:
    w: int
    merge: int
    groups: int
    selected: int
    kv_heads: int
    sel_heads: int
    heads_per_tile: int
    q_per_kv: int
    causal: bool
    include_local: bool
    scale: float
    interpret: bool

    @property
    def group_tokens(self):
        return self.w * self.merge

    @property
    def steps(self):
        return self.selected + self.merge


def _make_static(q, k, plan, scale, interpret) -> _Static:
    kv_heads, g = check_plan_inputs(q, k, k, plan)
    n, h = q.shape[2], q.shape[3]
    p = plan.kv_regions.shape[1]
    if not interpret and (plan.block_size % 8 or h % 128):
        raise NotImplementedError("Mosaic TPU tiles need W % 8 == 0 and H % 128 == 0, got "
                                  f"W={plan.block_size}, H={h}")
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    return _Static(plan.block_size, plan.merge, plan.num_groups, plan.max_selected, kv_heads, p, n // p, g,
                   plan.causal, plan.include_local, scale, interpret)


def _heads_major(x, heads_axis_size):
    """``[B, T, heads, H]`` -> ``[B, heads // hs, hs, T, H]``."""
    b, t, n, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n // heads_axis_size, heads_axis_size, t, h)


def _token_major(x):
    b, p, hp, t, h = x.shape
    return x.reshape(b, p * hp, t, h).transpose(0, 2, 1, 3)


def _kv_step(s, sel_ref, cnt_ref, b, p, g, st: _Static):
    """KV region read at step ``s`` of query group ``g``: selected ones, then the local block."""
    last = jnp.maximum(cnt_ref[b, p, g] - 1, 0)
    selected = sel_ref[b, p, g, jnp.minimum(s, last)]
    selected = jnp.where(cnt_ref[b, p, g] > 0, selected, 0)  # an empty row still needs an in-range block
    return jnp.where(s < st.selected, selected, g * st.merge + (s - st.selected))


def _active(s, cnt_ref, b, p, g, st: _Static):
    return jnp.where(s < st.selected, s < cnt_ref[b, p, g], st.include_local)


def _logits(q, k, region, group, st: _Static, local):
    """Scaled scores ``[rows, W]`` of a ``[hp * L, H]`` head-major query tile; causal mask on local steps."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32) * st.scale
    if not st.causal:
        return s, None
    rows = q.shape[0]
    qpos = group * st.group_tokens + jax.lax.rem(jax.lax.broadcasted_iota(jnp.int32, (rows, st.w), 0),
                                                 st.group_tokens)
    kpos = region * st.w + jax.lax.broadcasted_iota(jnp.int32, (rows, st.w), 1)
    keep = (qpos >= kpos) | jnp.logical_not(local)
    return jnp.where(keep, s, -jnp.inf), keep


def _fwd_kernel(sel_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, st: _Static):
    b, p, g, s = (pl.program_id(i) for i in range(4))

    @pl.when(s == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG_BIG, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    @pl.when(_active(s, cnt_ref, b, p, g, st))
    def _update():
        q = q_ref[...].reshape(-1, q_ref.shape[-1])
        logits, _ = _logits(q, k_ref[...], _kv_step(s, sel_ref, cnt_ref, b, p, g, st), g, st,
                            s >= st.selected)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
        prob = jnp.exp(logits - m_new)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + prob.sum(axis=1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + jax.lax.dot_general(
            prob.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=F32)
        m_scr[...] = m_new

    @pl.when(s == st.steps - 1)
    def _finish():
        l_i = l_scr[...]
        nonempty = l_i > 0
        out = acc_scr[...] / jnp.where(nonempty, l_i, 1.0)
        o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
        lse = jnp.where(nonempty, m_scr[...] + jnp.log(jnp.where(nonempty, l_i, 1.0)), -jnp.inf)
        lse_ref[...] = lse.reshape(lse_ref.shape)


def _group_specs(st: _Static, h):
    """Block specs of the forward/dQ grid ``(b, p, g, s)``; scalar-prefetch refs come last in index maps."""
    lt, hp = st.group_tokens, st.heads_per_tile
    tile = pl.BlockSpec((None, None, hp, lt, h), lambda b, p, g, s, sel, cnt: (b, p, 0, g, 0))
    stat = pl.BlockSpec((None, None, hp, lt), lambda b, p, g, s, sel, cnt: (b, p, 0, g))
    per_kv = st.sel_heads // st.kv_heads
    kv = pl.BlockSpec((None, None, st.w, h), lambda b, p, g, s, sel, cnt: (
        b, p // per_kv, _kv_step(s, sel, cnt, b, p, g, st), 0))
    return tile, stat, kv


def _forward(qh, kh, vh, sel, cnt, st: _Static):
    b, p, hp, t, h = qh.shape
    tile, stat, kv = _group_specs(st, h)
    rows = hp * st.group_tokens
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, p, st.groups, st.steps),
        in_specs=[tile, kv, kv], out_specs=[tile, stat],
        scratch_shapes=[pltpu.VMEM((rows, 1), F32), pltpu.VMEM((rows, 1), F32), pltpu.VMEM((rows, h), F32)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qh.shape, qh.dtype), jax.ShapeDtypeStruct((b, p, hp, t), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                                  "arbitrary")),
        interpret=st.interpret, name="block_sparse_fwd_tpu",
    )(sel, cnt, qh, kh, vh)


# ---------------------------------------------------------------------------------------------- backward


def _grad_terms(q, k, v, do, lse, delta, region, group, st: _Static, local):
    """``(p, ds)`` of one (query tile, KV region) pair; masked entries are exactly 0 in both."""
    logits, keep = _logits(q, k, region, group, st, local)
    prob = jnp.exp(logits - lse)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=F32)
    ds = prob * (dp - delta)
    if keep is not None:
        prob, ds = jnp.where(keep, prob, 0.0), jnp.where(keep, ds, 0.0)
    return prob, ds


def _dq_kernel(sel_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_scr, *,
               st: _Static):
    b, p, g, s = (pl.program_id(i) for i in range(4))

    @pl.when(s == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    @pl.when(_active(s, cnt_ref, b, p, g, st))
    def _update():
        h = q_ref.shape[-1]
        q, do = q_ref[...].reshape(-1, h), do_ref[...].reshape(-1, h)
        lse, delta = lse_ref[...].reshape(-1, 1), delta_ref[...].reshape(-1, 1)
        region = _kv_step(s, sel_ref, cnt_ref, b, p, g, st)
        k = k_ref[...]
        _, ds = _grad_terms(q, k, v_ref[...], do, lse, delta, region, g, st, s >= st.selected)
        acc_scr[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                            preferred_element_type=F32)

    @pl.when(s == st.steps - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * st.scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(reg_ref, grp_ref, sub_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, st: _Static, num_steps: int):
    b, kh, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    region, kind = reg_ref[b, kh, e], kind_ref[b, kh, e]

    @pl.when((e == 0) | (reg_ref[b, kh, jnp.maximum(e - 1, 0)] != region))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

    @pl.when((kind == 0) | ((kind == 1) & st.include_local))
    def _update():
        h = q_ref.shape[-1]
        q, do = q_ref[...].reshape(-1, h), do_ref[...].reshape(-1, h)
        lse, delta = lse_ref[...].reshape(-1, 1), delta_ref[...].reshape(-1, 1)
        prob, ds = _grad_terms(q, k_ref[...], v_ref[...], do, lse, delta, region, grp_ref[b, kh, e], st,
                               kind == 1)
        contract_rows = (((0,), (0,)), ((), ()))
        dv_scr[...] += jax.lax.dot_general(prob.astype(do.dtype), do, contract_rows,
                                           preferred_element_type=F32)
        dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, contract_rows, preferred_element_type=F32)

    @pl.when((e == num_steps - 1) | (reg_ref[b, kh, jnp.minimum(e + 1, num_steps - 1)] != region))
    def _finish():
        dk_ref[...] = (dk_scr[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_call(qh, kh, vh, doh, lse, delta, sel, cnt, st: _Static):
    b, p, hp, _, h = qh.shape
    tile, stat, kv = _group_specs(st, h)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, p, st.groups, st.steps),
        in_specs=[tile, kv, kv, tile, stat, stat], out_specs=tile,
        scratch_shapes=[pltpu.VMEM((hp * st.group_tokens, h), F32)])
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qh.shape, qh.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                                  "arbitrary")),
        interpret=st.interpret, name="block_sparse_dq_tpu",
    )(sel, cnt, qh, kh, vh, doh, lse, delta)


def _dkv_call(qh, kh, vh, doh, lse, delta, steps, st: _Static):
    b, _, hp, _, h = qh.shape
    lt, per_kv, num_steps = st.group_tokens, st.sel_heads // st.kv_heads, steps[0].shape[-1]

    tile = pl.BlockSpec((None, None, hp, lt, h), lambda bi, k, e, reg, grp, sub, kind: (
        bi, k * per_kv + sub[bi, k, e], 0, grp[bi, k, e], 0))
    stat = pl.BlockSpec((None, None, hp, lt), lambda bi, k, e, reg, grp, sub, kind: (
        bi, k * per_kv + sub[bi, k, e], 0, grp[bi, k, e]))
    kv = pl.BlockSpec((None, None, st.w, h), lambda bi, k, e, reg, grp, sub, kind: (bi, k, reg[bi, k, e], 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, st.kv_heads, num_steps),
        in_specs=[tile, kv, kv, tile, stat, stat], out_specs=[kv, kv],
        scratch_shapes=[pltpu.VMEM((st.w, h), F32), pltpu.VMEM((st.w, h), F32)])
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, num_steps=num_steps), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(kh.shape, kh.dtype), jax.ShapeDtypeStruct(vh.shape, vh.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=st.interpret, name="block_sparse_dkv_tpu",
    )(*steps, qh, kh, vh, doh, lse, delta)


# ------------------------------------------------------------------------------------------ custom VJP


def _plan(regions, st: _Static) -> SelectionPlan:
    return SelectionPlan(regions, block_size=st.w, merge=st.merge, causal=st.causal,
                         include_local=st.include_local)


def _layouts(q, k, v, st: _Static):
    hp = st.heads_per_tile
    return _heads_major(q, hp), _heads_major(k, 1)[:, :, 0], _heads_major(v, 1)[:, :, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, regions, st: _Static):
    sel, cnt = compact_plan(_plan(regions, st))
    out, lse = _forward(*_layouts(q, k, v, st), sel, cnt, st)
    b, p, hp, t = lse.shape
    return _token_major(out), lse.reshape(b, p * hp, t).transpose(0, 2, 1)


def _attend_fwd(q, k, v, regions, st):
    out, lse = _attend(q, k, v, regions, st)
    out, lse = named_residuals(out, lse)  # what the model's remat="save" keeps
    return (out, lse), (q, k, v, regions, out, lse)


def _attend_bwd(st, res, cotangents):
    q, k, v, regions, out, lse = res
    do, dlse = cotangents
    plan = _plan(regions, st)
    # [B, T, N]; empty rows: exp(s - inf) = 0
    delta, lse = backward_row_terms(do, out, lse, dlse, base2=False)
    stat = lambda x: _heads_major(x[..., None], st.heads_per_tile)[..., 0]
    qh, kh, vh = _layouts(q, k, v, st)
    doh = _heads_major(do, st.heads_per_tile)
    sel, cnt = compact_plan(plan)
    dq = _dq_call(qh, kh, vh, doh, stat(lse), stat(delta), sel, cnt, st)
    steps = transpose_plan_steps(plan, st.kv_heads)
    dk, dv = _dkv_call(qh, kh, vh, doh, stat(lse), stat(delta), steps, st)
    return _token_major(dq), _token_major(dk[:, :, None]), _token_major(dv[:, :, None]), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_sparse_attention_mosaic_tpu(q, k, v, plan: SelectionPlan, *, scale: float | None = None,
                                      return_lse: bool = False, interpret: bool = False):
    """Block-sparse attention with the Mosaic TPU kernels (same contract as the reference).

    Raises NotImplementedError off TPU unless ``interpret`` (Pallas interpreter, any backend), so the
    dispatcher falls through to the next implementation.
    """
    decline_platform("pallas_mosaic_tpu", "tpu", interpret)
    decline_dtype("pallas_mosaic_tpu", q.dtype, (jnp.bfloat16, jnp.float32))
    check_plan_inputs(q, k, v, plan)
    st = _make_static(q, k, plan, scale, bool(interpret))
    out, lse = _attend(q, k, v, plan.kv_regions.astype(jnp.int32), st)
    return (out, lse) if return_lse else out


IMPLEMENTATION = block_sparse_attention_mosaic_tpu  # what ``api`` registers as "pallas_mosaic_tpu"
