"""Block-sparse flash attention backward for Hopper in Pallas Mosaic GPU: a dQ pass and a dK/dV pass (by
default; or one pass with dQ fused in, below).

Both passes are deterministic (every output tile has exactly one writer, no atomics) and read the residuals
the forward (``pallas_mosaic_gpu``, which imports this module: the pieces both use are in
``pallas_mosaic_gpu_common``) saved: ``out`` only through ``delta = rowsum(dO * out)``, and the
natural-log LSE. Both per-query statistics travel as one ``stats`` array ``[B, N, 2, T]`` f32 (``lse * log2
e``, ``delta``), so one TMA copy brings a 64-query slice of both. By default XLA computes delta before the
passes; with ``MosaicTiling.delta_in_dq`` (off) ``prepare`` leaves ``-dlse`` in row 1 and the dQ pass adds
``rowsum(dO * out)`` (``out`` read from global memory into registers) and writes the completed ``stats`` that
the dK/dV pass reads.

dQ pass (plan-driven, same work items, producer and K/V ring as the forward): each compute warpgroup holds 64
query rows of one head with their Q and dO tiles in shared memory; per selected K/V block (then the local
block, causally masked)

    S = Q K^T, dP = dO V^T  (two wgmma, one wait) -> P = exp2(S c - lse2), dS = P (dP - delta)
    dQ += dS K              (dS the register A operand)

With ``MosaicTiling.overlap_dq`` (off) each step's dQ product is deferred to the next step, issued beside its
S (``_dq_overlapped_steps``).

dK/dV pass (transposed plan): a work item is one KV region of one kv head; compute warpgroup ``w`` owns its
keys ``[64 w, 64 w + 64)`` with K and V in shared memory and dK, dV in f32 registers. The producer warpgroup
streams 64-query chunks (Q, dO, stats) of every reader into a ``stages``-deep ring: first the query groups
that selected the region (CSR rows of ``transpose_plan``), then the region's own group (causal). Per chunk

    S^T = K Q^T -> P^T = exp2(S^T c - lse2), dV += P^T dO, dP^T = V dO^T  (dV and dP^T: one wait)
    dS^T = P^T (dP^T - delta), dK += dS^T Q

so keys are every matmul's M dimension and nothing is transposed in registers. Regions differ a lot in how
many groups read them (early regions are selected by most later groups), so items run longest first: the
persistent CTAs are dealt them in snake order from a device-side sort by reader count (``_snake``).

Fused dQ (``MosaicTiling.fused_dq``, off by default): the dK/dV pass also adds ``dQ += dS K`` per chunk into
an f32 dQ in global memory (``dS^T`` stored to shared memory and read as the transposed wgmma A operand, the
f32 tile copied out by TMA reduce-add), so the dQ pass is skipped: five matmuls per block pair instead of
seven. Correct, but slower on the H200 (the reduce-add traffic; numbers in ``MosaicTiling``) and not bitwise
deterministic. The interpreter has no TMA reductions: there each CTA and warpgroup adds into a private f32
slice and XLA sums the slices.

Interpret mode (CPU tests) replaces the wgmma calls by plain dots on loaded values, as the forward does: the
interpreter's wgmma takes neither transposed nor register operands; barriers, copies and indexing are real.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu_common as _mgc
from selmerge_jax.kernels.block_sparse_attention._common import (
    F32,
    LOG2E,
    backward_row_terms,
    dot,
    finite_lse,
)
from selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu_common import BQ, Static
from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan
from selmerge_jax.kernels.block_sparse_attention.transpose import compact_plan, stable_argsort, transpose_plan

__all__ = ["attend_bwd"]  # prepare / dq_pass / dkv_pass: the VJP's pieces, timed apart by the benchmark

# BQ (64): query rows per dQ warpgroup, keys per dK/dV warpgroup, queries per dK/dV chunk
_smem = _mgc.smem


def _load_vec(ref, axis: int, st):
    """A 64-vector of per-query statistics in the layout that broadcasts along ``axis`` of a wgmma tile."""
    if st.interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def _zeros(shape, st):
    return _mgc.as_layout(jnp.zeros(shape, F32), plgpu.Layout.WGMMA, st)


def _two_wgmma(a1, b1, a2, b2, acc1, issued=None):
    """``(acc1 + a1 @ b1, a2 @ b2)``: both wgmma in flight, one wait. ``b`` refs are ``[K, N]`` views, ``a1``
    a shared-memory ref or registers, ``acc1`` a zero or running f32 accumulator. ``issued()`` runs after
    both are issued and before the wait (the ping-pong rendezvous)."""
    zeros = plgpu.layout_cast(jnp.zeros((a2.shape[0], b2.shape[1]), F32), plgpu.Layout.WGMMA)

    def body(refs):
        plgpu.wgmma(refs[0], a1, b1)
        plgpu.wgmma(refs[1], a2, b2)
        if issued is not None:
            issued()

    return pl.run_state(body)((plgpu.ACC.init(acc1), plgpu.ACC.init(zeros)))


def _t(ref):
    """``ref`` as the transposed wgmma B operand (``[N, K]`` in memory, read as ``[K, N]``)."""
    return plgpu.transpose_ref(ref, (1, 0))


def _scores_t(k_s, q_s, acc_ref):
    """``S^T = K Q^T`` into a zeroed accumulator (read back, i.e. awaited)."""
    plgpu.wgmma(acc_ref, k_s, _t(q_s))
    return acc_ref[...]


def _iota(shape, dim, st):
    return _mgc.as_layout(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA, st)


# ----------------------------------------------------------------------------------------------- dQ pass


def _load_tile(ref, st: Static, optimized=True):
    """A ``[64, H]`` tile in the wgmma register layout (from shared or, unoptimized, global memory)."""
    return ref[...] if st.interpret else plgpu.load(ref, layout=plgpu.Layout.WGMMA, optimized=optimized)


def _row_dot(do_s, o, st: Static):
    """``rowsum(dO * O)`` of a 64-query tile (f32, in the layout that broadcasts along S's rows), ``dO`` from
    its shared-memory tile, ``O`` in registers."""
    return (_load_tile(do_s, st).astype(F32) * o.astype(F32)).sum(axis=1)


def _dq_consumer(refs, st: Static):
    (cnt_ref, q_ref, do_ref, stat_ref, out_ref, dq_ref, stat_out_ref, q_smem, do_smem, st_smem, k_smem,
     v_smem, q_bar, do_bar, st_bar, k_bar, v_bar, k_free, v_free, sched) = refs
    wg = lax.axis_index("wg")
    # Optional ping-pong as in the forward: one warpgroup's matmuls run while the other computes dS. Off by
    # default: H100 64K dQ pass 6.62 ms with it, 5.71 ms without
    # (experiments/results/archive/attention_h100_run8b.jsonl).
    pingpong = st.wgs == 2 and st.tiling.pingpong_dq
    if st.wgs == 2:
        plgpu.set_max_registers(st.tiling.compute_registers, action="increase")
    stages, c = st.tiling.stages, st.scale * LOG2E
    dtype = jnp.dtype(st.dtype)
    q_s, do_s, stat_s = q_smem.at[wg], do_smem.at[wg], st_smem.at[wg]

    def step(i, dq, lse2, delta, chunk, masked=False):
        slot = lax.rem(i, jnp.int32(stages))
        k_s, v_s = k_smem.at[slot], v_smem.at[slot]
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        meet = functools.partial(_mgc.rendezvous, sched) if pingpong else None
        if st.interpret:
            s, dp = dot(q_s[...], k_s[...], trans_b=True), dot(do_s[...], v_s[...], trans_b=True)
            if meet:
                meet()
        else:
            s, dp = _two_wgmma(q_s, _t(k_s), do_s, _t(v_s), _zeros((BQ, st.w), st), issued=meet)
        plgpu.barrier_arrive(v_free.at[slot])
        p = jnp.exp2(s * c - _mgc.bcast_rows(lse2, s.shape))  # lse2 = +inf (no finite LSE) gives p = 0
        if masked:
            p = jnp.where(_iota(s.shape, 0, st) + chunk * BQ >= _iota(s.shape, 1, st), p, 0.0)
        ds = (p * (dp - _mgc.bcast_rows(delta, dp.shape))).astype(dtype)
        if pingpong:  # dS done before signalling (else the compiler sinks it past the wait), then our turn
            ds = lax.optimization_barrier(ds)
            _mgc.rendezvous(sched)
        dq = _mgc.pv(dq, ds, k_s, st)  # dQ += dS K, dS from registers
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

    def item(j, base):
        b, kh, g, chunk, head = _mgc.unit(j, wg, st)
        t_rows = pl.ds(g * st.w + chunk * BQ, BQ)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's dQ (and stats) left q_s, stat_s
        plgpu.copy_gmem_to_smem(q_ref.at[b, t_rows, head], q_s, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, t_rows, head], do_s, do_bar.at[wg])
        plgpu.copy_gmem_to_smem(stat_ref.at[b, head, :, t_rows], stat_s, st_bar.at[wg])
        # O straight from global memory into registers (the pass has no shared memory to spare), issued
        # before the waits so that its latency is theirs
        o = _load_tile(out_ref.at[b, t_rows, head], st, optimized=False) if st.tiling.delta_in_dq else None
        cnt = cnt_ref[b, kh, g]
        plgpu.barrier_wait(st_bar.at[wg])
        lse2 = _load_vec(stat_s.at[0], 1, st)
        plgpu.barrier_wait(q_bar.at[wg])
        plgpu.barrier_wait(do_bar.at[wg])
        if st.tiling.delta_in_dq:  # stats row 1 holds -dlse; completed here and written out for dK/dV
            delta = _row_dot(do_s, o, st) + _load_vec(stat_s.at[1], 1, st)
            # Row 1 is read and rewritten in place with no barrier between: the threads holding one row are
            # lanes of one warp (the wgmma layout gives each warp 16 rows), which run this straight-line code
            # converged, so all of them load before any stores, and they store the same value.
            stat_s.at[1][...] = delta
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(stat_s, stat_out_ref.at[b, head, :, t_rows])
        else:
            delta = _load_vec(stat_s.at[1], 1, st)
        if st.tiling.overlap_dq:
            dq = _dq_overlapped_steps((q_s, do_s, k_smem, v_smem), (k_bar, v_bar, k_free, v_free), base, cnt,
                                      chunk, (lse2, delta), st)
        else:
            dq = lax.fori_loop(base, base + cnt, lambda i, a: step(i, a, lse2, delta, chunk),
                               _zeros((BQ, st.h), st))
            dq = step(base + cnt, dq, lse2, delta, chunk, masked=True)  # the local region, causal
        q_s[...] = (dq * st.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_s, dq_ref.at[b, t_rows, head])
        return base + cnt + 1

    if pingpong:
        pl.when(wg == 1)(lambda: _mgc.rendezvous(sched))  # warpgroup 1 runs half a step behind warpgroup 0
    lax.fori_loop(0, _mgc.num_items(st), item, jnp.int32(0))
    if pingpong:
        pl.when(wg == 0)(lambda: _mgc.rendezvous(sched))  # balances warpgroup 1's extra rendezvous
    plgpu.wait_smem_to_gmem(0)


def _dq_overlapped_steps(tiles, ring, base, cnt, chunk, stats, st: Static):
    """One unit's ``cnt + 1`` dQ steps with each dQ product deferred a step (``MosaicTiling.overlap_dq``) ->
    dQ ``[64, H]`` f32, unscaled.

    Step ``i`` issues ``dQ += dS_{i-1} K_{i-1}`` and ``S_i = Q K_i^T``, then, once the dQ product is done
    (``K_{i-1}``'s slot goes back, about when the plain step releases it), ``dP_i = dO V_i^T``; it waits for
    ``S_i`` only and computes ``P_i`` while ``dP_i`` is still on the tensor cores. So the tensor cores take
    the products back to back, where the plain step waits for its dQ product, then issues the next pair and
    waits for both. Registers: ``dS_{i-1}`` (the register A operand) lives until its product is done, beside
    dQ and ``S_i`` only; ``dP_i`` comes after. The last step is the local region, causal; a unit's first
    64-token chunk of a 128-token region sees only the region's first 64 keys there, so that step multiplies
    those alone (as the forward's). When the row selects nothing the local region is step 0, at full width.

    dQ lives in a wgmma accumulator so that its product can stay in flight; the interpreter has none, so
    there dQ is carried as a value (None on the GPU) and the products are plain dots."""
    q_s, do_s, k_smem, v_smem = tiles
    k_bar, v_bar, k_free, v_free = ring
    lse2, delta = stats
    stages, c, last, dtype = st.tiling.stages, st.scale * LOG2E, base + cnt, jnp.dtype(st.dtype)
    ring_slot = lambda i: lax.rem(i, jnp.int32(stages))
    keys = functools.partial(_mgc.key_rows, st=st)

    def causal(p):
        return jnp.where(_iota(p.shape, 0, st) + chunk * BQ >= _iota(p.shape, 1, st), p, 0.0)

    def probs(s, masked):
        """``P = exp2(S c - lse2)`` (``lse2 = +inf``, no finite LSE, gives 0), causal where ``masked``: True,
        or a traced predicate (step 0 of a row that selects nothing is its local region)."""
        p = jnp.exp2(s * c - _mgc.bcast_rows(lse2, s.shape))
        if masked is True:
            return causal(p)
        return p if masked is False else lax.cond(masked, causal, lambda p: p, p)

    def issue(dq_ref, dq, i, n, ds_prev, masked):
        """``(P_i, dP_i, dq)`` over the first ``n`` keys of step ``i``'s slot, the previous step's dQ product
        (a full-width selected block) issued first when there is one."""
        slot = ring_slot(i)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        k_s, v_s = keys(k_smem, slot, n), keys(v_smem, slot, n)
        k_prev = None if ds_prev is None else k_smem.at[ring_slot(i - 1)]
        if st.interpret:
            if ds_prev is not None:
                dq = dq + dot(ds_prev, k_prev[...])
                plgpu.barrier_arrive(k_free.at[ring_slot(i - 1)])
            p = probs(dot(q_s[...], k_s[...], trans_b=True), masked)
            return p, dot(do_s[...], v_s[...], trans_b=True), dq

        def body(s_ref, dp_ref):
            if ds_prev is not None:
                plgpu.wgmma(dq_ref, ds_prev, k_prev)
            plgpu.wgmma(s_ref, q_s, _t(k_s))
            if ds_prev is not None:
                plgpu.wgmma_wait(1)  # the dQ product is done (each wgmma is its own group, done in order)
                plgpu.barrier_arrive(k_free.at[ring_slot(i - 1)])
            plgpu.wgmma(dp_ref, do_s, _t(v_s))
            p = probs(plgpu.wgmma_accumulator_load(s_ref, wait_n=1), masked)  # beside dP_i
            return p, dp_ref[...]

        p, dp = pl.run_scoped(body, plgpu.ACC((BQ, n), F32), plgpu.ACC((BQ, n), F32))
        return p, dp, dq

    def step(dq_ref, i, carry, n=st.w, masked=False):
        """Step ``i``: the deferred dQ product, ``S_i``, ``dP_i`` -> ``(dS_i, dq)``."""
        ds_prev, dq = carry
        p, dp, dq = issue(dq_ref, dq, i, n, ds_prev, masked)
        plgpu.barrier_arrive(v_free.at[ring_slot(i)])
        return (p * (dp - _mgc.bcast_rows(delta, dp.shape))).astype(dtype), dq

    def finish(dq_ref, carry, n):
        """The last step's dQ product (over ``n`` keys) -> dQ."""
        ds, dq = carry
        slot = ring_slot(last)
        k_s = keys(k_smem, slot, n)
        if st.interpret:
            dq = dq + dot(ds, k_s[...])
        else:
            plgpu.wgmma(dq_ref, ds, k_s)
            dq = plgpu.wgmma_accumulator_load(dq_ref, wait_n=0)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

    def steps(dq_ref):
        dq = jnp.zeros((BQ, st.h), F32) if st.interpret else None
        carry = step(dq_ref, base, (None, dq), masked=cnt == 0)
        carry = lax.fori_loop(base + 1, last, lambda i, cr: step(dq_ref, i, cr), carry)  # selected regions
        local = lambda n: lambda cr: finish(dq_ref, step(dq_ref, last, cr, n, masked=True), n)
        if st.chunks == 2:  # the first chunk's local step over the region's first 64 keys only
            last_step = lambda cr: lax.cond(chunk == 0, local(BQ), local(st.w), cr)
        else:
            last_step = local(st.w)
        return lax.cond(cnt == 0, lambda cr: finish(dq_ref, cr, st.w), last_step, carry)

    if st.interpret:
        return steps(None)
    return pl.run_scoped(steps, plgpu.ACC((BQ, st.h), F32))


def _dq_kernel(*refs, st):
    """Refs: the inputs (``out`` last with ``delta_in_dq``), the outputs (dQ; the completed stats with
    ``delta_in_dq``), the scratch."""
    rows = int(st.tiling.delta_in_dq)
    sel_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, stat_ref = refs[:7]
    out_ref = refs[7] if rows else None
    dq_ref = refs[7 + rows]
    stat_out_ref = refs[8 + rows] if rows else None
    (q_smem, do_smem, st_smem, k_smem, v_smem, q_bar, do_bar, st_bar, k_bar, v_bar, k_free, v_free,
     sched) = refs[8 + 2 * rows:]
    wg = lax.axis_index("wg")
    consumer = (cnt_ref, q_ref, do_ref, stat_ref, out_ref, dq_ref, stat_out_ref, q_smem, do_smem, st_smem,
                k_smem, v_smem, q_bar, do_bar, st_bar, k_bar, v_bar, k_free, v_free, sched)
    pl.when(wg < st.wgs)(lambda: _dq_consumer(consumer, st))
    producer = (sel_ref, cnt_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free)
    pl.when(wg == st.wgs)(lambda: _mgc.kv_producer(producer, st))  # the forward's plan-row K/V streamer


def _dq_call(q, k, v, do, stats, sel, cnt, out, st: Static):
    """``(dq, stats)``: with ``delta_in_dq`` the stats with row 1 completed (``rowsum(dO O)`` added to the
    ``-dlse`` it held), else ``stats`` as given."""
    h, dtype, stages = q.shape[3], q.dtype, st.tiling.stages
    tile = lambda n: _smem((n, BQ, h), dtype)
    scratch = (
        tile(st.wgs), tile(st.wgs), plgpu.SMEM((st.wgs, 2, BQ), F32),
        _smem((stages, st.w, h), dtype), _smem((stages, st.w, h), dtype),
        plgpu.Barrier(num_barriers=st.wgs), plgpu.Barrier(num_barriers=st.wgs),
        plgpu.Barrier(num_barriers=st.wgs),
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        _mgc.ring_free(st, stages), _mgc.ring_free(st, stages), plgpu.Barrier(num_arrivals=st.wgs),
    )
    rows = st.tiling.delta_in_dq
    dq_out = jax.ShapeDtypeStruct(q.shape, dtype)
    res = plgpu.kernel(
        functools.partial(_dq_kernel, st=st),
        out_type=(dq_out, jax.ShapeDtypeStruct(stats.shape, F32)) if rows else dq_out,
        scratch_types=scratch,
        **_mgc.launch_grid(st),
        num_threads=st.wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=st.tiling.approx_math),
        interpret=_mgc.interpret_params() if st.interpret else None,
    )(sel, cnt, q, k, v, do, stats, *((out,) if rows else ()))
    return res if rows else (res, stats)


# -------------------------------------------------------------------------------------------- dK/dV pass


@dataclasses.dataclass(frozen=True)
class _KVStatic:
    w: int
    h: int
    batch: int
    regions: int
    kv_heads: int
    q_per_kv: int
    entries: int
    scale: float
    dtype: str
    stages: int
    registers: int
    producer_registers: int  # MosaicTiling.producer_registers
    approx_math: bool
    interpret: bool
    ctas: int
    fuse_dq: bool  # dQ added here (TMA reduce-add into f32), not in a dQ pass: MosaicTiling.fused_dq
    exchange: bool  # MosaicTiling.dq_exchange
    slots: int  # MosaicTiling.dq_slots
    swizzle: bool  # MosaicTiling.dq_swizzle

    @property
    def wgs(self) -> int:
        """Compute warpgroups: one per 64 keys of the region."""
        return self.w // BQ

    @property
    def chunk_steps(self) -> int:
        """Ring steps per reading query group: its heads x 64-token chunks."""
        return self.q_per_kv * (self.w // BQ)

    @property
    def items(self) -> int:
        return self.batch * self.kv_heads * self.regions


def _snake(j, ctas: int):
    """Position of this CTA in round ``j`` of dealing the sorted items: left to right, then right to left.
    Dealt plainly round-robin, CTA 0 would take the largest item of every round (H100 64K spec: the busiest
    CTA gets 1.085x the mean work; snake order 1.024x)."""
    cta = lax.axis_index("cta")
    return jnp.where(lax.rem(j, jnp.int32(2)) == 0, cta, jnp.int32(ctas - 1) - cta)


def _kv_item(j, order_ref, off_ref, st: _KVStatic):
    """This CTA's ``j``-th item (longest first) -> ``(b, kh, region, first entry, readers)``."""
    item = order_ref[j * st.ctas + _snake(j, st.ctas)]
    region, bk = lax.rem(item, jnp.int32(st.regions)), lax.div(item, jnp.int32(st.regions))
    b, kh = lax.div(bk, jnp.int32(st.kv_heads)), lax.rem(bk, jnp.int32(st.kv_heads))
    first = off_ref[b, kh, region]
    return b, kh, region, first, off_ref[b, kh, region + 1] - first


def _kv_num_items(st: _KVStatic):
    rounds, rest = divmod(st.items, st.ctas)  # the last, partial round deals positions [0, rest)
    return jnp.int32(rounds) + (_snake(jnp.int32(rounds), st.ctas) < rest).astype(jnp.int32)


def _kv_chunk(s, readers, first, region, ent_ref, b, kh, st: _KVStatic):
    """Step ``s`` of an item -> ``(token rows, query head)`` of the 64-query chunk it reads. A selecting
    group's steps run chunk fastest; the region's own group runs head fastest, so the chunks a warpgroup
    cannot see (queries before its keys) come first and it skips them in one stretch (unless the warpgroups
    exchange dS^T: then both run every step, the hidden ones fully masked).

    With dQ fused, the selecting groups are visited from the ``region``-th on (wrapping): the items of one kv
    head run at the same time on many CTAs and would otherwise reduce-add into the same dQ rows in lockstep,
    serialised at the same L2 lines."""
    per = jnp.int32(st.chunk_steps)
    reader, rest = lax.div(s, per), lax.rem(s, per)
    chunks, heads = jnp.int32(st.w // BQ), jnp.int32(st.q_per_kv)
    local = reader == readers
    if st.fuse_dq:
        reader = jnp.where(local, reader, lax.rem(reader + region, jnp.maximum(readers, 1)))
    code = ent_ref[b, kh, jnp.minimum(first + reader, st.entries - 1)]  # P == K: the code is the group
    group = jnp.where(local, region, code)
    chunk = jnp.where(local, lax.div(rest, heads), lax.rem(rest, chunks))
    head = jnp.where(local, lax.rem(rest, heads), lax.div(rest, chunks))
    return pl.ds(group * st.w + chunk * BQ, BQ), kh * st.q_per_kv + head


def _dkv_producer(refs, st: _KVStatic):
    order_ref, off_ref, ent_ref, q_ref, do_ref, stat_ref, q_smem, do_smem, st_smem, q_bar, do_bar, st_bar, \
        free = refs
    if st.wgs == 2:
        plgpu.set_max_registers(st.producer_registers, action="decrease")

    def item(j, base):
        b, kh, region, first, readers = _kv_item(j, order_ref, off_ref, st)

        @pl.loop(0, (readers + 1) * st.chunk_steps)
        def _(s):
            slot, reuse = lax.rem(base + s, jnp.int32(st.stages)), base + s >= st.stages
            rows, head = _kv_chunk(s, readers, first, region, ent_ref, b, kh, st)
            pl.when(reuse)(functools.partial(plgpu.barrier_wait, free.at[slot]))
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_smem.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_smem.at[slot], do_bar.at[slot])
            plgpu.copy_gmem_to_smem(stat_ref.at[b, head, :, rows], st_smem.at[slot], st_bar.at[slot])

        return base + (readers + 1) * st.chunk_steps

    total = lax.fori_loop(0, _kv_num_items(st), item, jnp.int32(0))

    @pl.loop(jnp.maximum(total - st.stages, 0), total)  # observe the last releases (see the forward)
    def _(i):
        plgpu.barrier_wait(free.at[lax.rem(i, jnp.int32(st.stages))])


def _dq_share(w: int, ds_smem, k_smem, stage, dst, ld_bar, use, st: _KVStatic):
    """Warpgroup ``w``'s share of the chunk's dQ, added into the f32 accumulator at ``dst(cols)``. Exchanged:
    the 64-column blocks ``c = w (mod wgs)`` of ``sum_x dS_x K_x`` over both warpgroups' tiles (``dS_x`` the
    transpose of warpgroup ``x``'s ``dS^T`` in ``ds_smem``); else every column block of its own ``dS_w K_w``.
    On a GPU by TMA reduce-add; the interpreter has no TMA reductions, so there ``dst`` is this warpgroup's
    private slice and the tile is read, added and written back."""
    blocks = range(w, st.h // BQ, st.wgs) if st.exchange else range(st.h // BQ)
    sources = range(st.wgs) if st.exchange else (w,)
    for n, c in enumerate(blocks):
        cols = pl.ds(c * BQ, BQ)
        if st.interpret:
            dq = sum(dot(ds_smem[x], k_smem[x, :, cols], trans_a=True) for x in sources)
        else:
            def body(acc_ref, cols=cols):
                for x in sources:
                    plgpu.wgmma(acc_ref, _t(ds_smem.at[x]), k_smem.at[x, :, cols])

            dq = pl.run_state(body)(plgpu.ACC.init(_zeros((BQ, BQ), st)))
        # The tiles are used in turn by this warpgroup's reduce-adds, numbered without gaps within an item
        # (``use`` skips no step), so two uses of one tile are ``slots`` commits apart: once at most
        # slots - 1 bulk groups are pending, the reduce that last read this tile is done. Between items the
        # item start waits for every group.
        slot = lax.rem(use * len(blocks) + n, jnp.int32(st.slots))
        out, tile = dst(cols), stage.at[slot, w]
        plgpu.wait_smem_to_gmem(st.slots - 1, wait_read_only=True)
        if st.interpret:
            plgpu.copy_gmem_to_smem(out, tile, ld_bar.at[w])
            plgpu.barrier_wait(ld_bar.at[w])
            tile[...] = tile[...] + dq
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(tile, out)
            plgpu.wait_smem_to_gmem(0)
        else:
            tile[...] = dq
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(tile, out, reduction_op="add")


def _zero_private_dq(acc_ref, stage, wg, st: _KVStatic):
    """Interpreter only: this warpgroup's private dQ slice ``acc_ref[cta, wg]`` starts at zero."""
    tile = stage.at[0, wg]
    tile[...] = jnp.zeros((BQ, BQ), F32)
    plgpu.commit_smem()
    own = acc_ref.at[lax.axis_index("cta"), wg]
    rows_per_b, n = own.shape[1] // BQ, own.shape[2]

    @pl.loop(0, st.batch * rows_per_b * n)
    def _(i):
        b, rest = lax.div(i, jnp.int32(rows_per_b * n)), lax.rem(i, jnp.int32(rows_per_b * n))
        rows, head = pl.ds(lax.div(rest, jnp.int32(n)) * BQ, BQ), lax.rem(rest, jnp.int32(n))
        for c in range(st.h // BQ):
            plgpu.copy_smem_to_gmem(tile, own.at[b, rows, head, pl.ds(c * BQ, BQ)])

    plgpu.wait_smem_to_gmem(0)


def _dkv_consumer(refs, st: _KVStatic):
    (order_ref, off_ref, ent_ref, k_ref, v_ref, dk_ref, dv_ref, dq_ref, q_smem, do_smem, st_smem, k_smem,
     v_smem, ds_smem, stage, q_bar, do_bar, st_bar, kv_bar, free, sync, ld_bar) = refs
    wg = lax.axis_index("wg")
    if st.wgs == 2:
        plgpu.set_max_registers(st.registers, action="increase")
    c, dtype = st.scale * LOG2E, jnp.dtype(st.dtype)
    k_s, v_s = k_smem.at[wg], v_smem.at[wg]
    tile = (BQ, BQ)
    if st.fuse_dq and st.interpret:
        _zero_private_dq(dq_ref, stage, wg, st)

    def add_dq(ds, rows, head, where, use):
        """Puts this warpgroup's dS^T tile where the dQ wgmma reads it and adds this warpgroup's share of
        dQ. Exchanged, the warpgroups meet once both tiles are there and again once both are read (so the
        next step does not overwrite a tile still being read)."""
        b = where[0]
        ds_smem.at[wg][...] = ds
        plgpu.commit_smem()
        if st.exchange:
            _mgc.rendezvous(sync)
        acc = dq_ref.at[lax.axis_index("cta"), wg] if st.interpret else dq_ref
        dst = lambda cols: acc.at[b, rows, head, cols]
        for w in range(st.wgs):
            pl.when(wg == w)(functools.partial(_dq_share, w, ds_smem, k_smem, stage, dst, ld_bar, use, st))
        if st.exchange:
            _mgc.rendezvous(sync)

    def step(i, carry, s, masked, where, use):
        b, kh, region, first, readers = where
        if st.fuse_dq:  # the chunk's rows and head: a scalar read from global memory, issued early
            rows, head = _kv_chunk(s, readers, first, region, ent_ref, b, kh, st)
        dk, dv = carry
        slot = lax.rem(i, jnp.int32(st.stages))
        q_s, do_s = q_smem.at[slot], do_smem.at[slot]
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(st_bar.at[slot])
        lse2, delta = _load_vec(st_smem.at[slot, 0], 0, st), _load_vec(st_smem.at[slot, 1], 0, st)
        plgpu.barrier_wait(do_bar.at[slot])
        if st.interpret:
            s_t = dot(k_s[...], q_s[...], trans_b=True)
        else:
            s_t = pl.run_scoped(functools.partial(_scores_t, k_s, q_s), plgpu.ACC(tile, F32))
        p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse2, tile, [1]))  # lse2 = +inf gives p = 0
        if masked:  # key wg*64 + row sees query chunk*64 + col of its own group when key <= query
            chunk = lax.div(s - readers * st.chunk_steps, jnp.int32(st.q_per_kv))
            keep = _iota(tile, 0, st) + wg * BQ <= _iota(tile, 1, st) + chunk * BQ
            p_t = jnp.where(keep, p_t, 0.0)
        if st.interpret:
            dv = dv + dot(p_t.astype(dtype), do_s[...])
            dp_t = dot(v_s[...], do_s[...], trans_b=True)
        else:
            dv, dp_t = _two_wgmma(p_t.astype(dtype), do_s, v_s, _t(do_s), dv)
        ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, tile, [1]))).astype(dtype)
        dk = _mgc.pv(dk, ds_t, q_s, st)  # dK += dS^T Q
        plgpu.barrier_arrive(free.at[slot])  # the fused dQ reads dS^T and K, not the ring's Q / dO
        if st.fuse_dq:
            add_dq(ds_t, rows, head, where, use)
        return dk, dv

    def item(j, base):
        where = _kv_item(j, order_ref, off_ref, st)
        b, kh, region, _, readers = where
        keys = pl.ds(region * st.w + wg * BQ, BQ)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's dK/dV have left k_s/v_s
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kh], k_s, kv_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kh], v_s, kv_bar.at[st.wgs + wg])
        plgpu.barrier_wait(kv_bar.at[wg])
        plgpu.barrier_wait(kv_bar.at[st.wgs + wg])
        n_sel = readers * st.chunk_steps
        zeros = _zeros((BQ, st.h), st)
        carry = lax.fori_loop(0, n_sel, lambda s, a: step(base + s, a, s, False, where, s), (zeros, zeros))
        # The own group's chunks before this warpgroup's keys are all masked: skipped, unless the
        # warpgroups exchange dS^T (the other warpgroup's keys see them and the two meet at every step).
        hidden = n_sel + (0 if st.exchange else wg * st.q_per_kv)

        @pl.loop(n_sel, hidden)
        def _(s):
            slot = lax.rem(base + s, jnp.int32(st.stages))
            for bar in (q_bar, st_bar, do_bar):  # keep the barrier phases in step with the ring
                plgpu.barrier_wait(bar.at[slot])
            plgpu.barrier_arrive(free.at[slot])

        skipped = hidden - n_sel  # steps without a reduce-add: the fused dQ's tile count leaves them out
        dk, dv = lax.fori_loop(hidden, n_sel + st.chunk_steps,
                               lambda s, a: step(base + s, a, s, True, where, s - skipped), carry)
        k_s[...] = (dk * st.scale).astype(dtype)
        v_s[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_s, dk_ref.at[b, keys, kh])
        plgpu.copy_smem_to_gmem(v_s, dv_ref.at[b, keys, kh])
        return base + n_sel + st.chunk_steps

    lax.fori_loop(0, _kv_num_items(st), item, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(*refs, st):
    """Refs: the inputs (the f32 dQ accumulator last when dQ is fused on a GPU), the outputs (dK, dV; the
    interpreter's private dQ slices last when fused), the scratch."""
    n_in = 8 + (st.fuse_dq and not st.interpret)
    n_out = 2 + (st.fuse_dq and st.interpret)
    order_ref, off_ref, ent_ref, q_ref, k_ref, v_ref, do_ref, stat_ref = refs[:8]
    outs = refs[n_in:n_in + n_out]
    dk_ref, dv_ref = outs[:2]
    dq_ref = refs[8] if n_in == 9 else (outs[2] if n_out == 3 else None)
    scratch = refs[n_in + n_out:]
    q_smem, do_smem, st_smem, k_smem, v_smem, q_bar, do_bar, st_bar, kv_bar, free = scratch[:10]
    ds_smem, stage, sync, ld_bar = scratch[10:] if st.fuse_dq else (None,) * 4
    wg = lax.axis_index("wg")
    consumer = (order_ref, off_ref, ent_ref, k_ref, v_ref, dk_ref, dv_ref, dq_ref, q_smem, do_smem, st_smem,
                k_smem, v_smem, ds_smem, stage, q_bar, do_bar, st_bar, kv_bar, free, sync, ld_bar)
    pl.when(wg < st.wgs)(lambda: _dkv_consumer(consumer, st))
    producer = (order_ref, off_ref, ent_ref, q_ref, do_ref, stat_ref, q_smem, do_smem, st_smem, q_bar, do_bar,
                st_bar, free)
    pl.when(wg == st.wgs)(lambda: _dkv_producer(producer, st))


def _dkv_call(q, k, v, do, stats, order, offsets, entries, st: _KVStatic):
    """``(dk, dv)``, or ``(dq, dk, dv)`` when dQ is fused."""
    h, dtype = q.shape[3], q.dtype
    fused = st.fuse_dq
    scratch: tuple = (
        _smem((st.stages, BQ, h), dtype), _smem((st.stages, BQ, h), dtype),
        plgpu.SMEM((st.stages, 2, BQ), F32),
        _smem((st.wgs, BQ, h), dtype), _smem((st.wgs, BQ, h), dtype),
        plgpu.Barrier(num_barriers=st.stages), plgpu.Barrier(num_barriers=st.stages),
        plgpu.Barrier(num_barriers=st.stages), plgpu.Barrier(num_barriers=2 * st.wgs),
        plgpu.Barrier(num_arrivals=st.wgs, num_barriers=st.stages),
    )
    if fused:  # dS^T tiles, the f32 dQ staging (plain: TMA copies it out), the meeting and load barriers
        swizzled = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)) if st.swizzle else ()
        scratch += (_smem((st.wgs, BQ, BQ), dtype),
                    plgpu.SMEM((st.slots, st.wgs, BQ, BQ), F32, transforms=swizzled),
                    plgpu.Barrier(num_arrivals=st.wgs), plgpu.Barrier(num_barriers=st.wgs))
    out = jax.ShapeDtypeStruct(k.shape, dtype)
    outs: tuple = (out, out)
    ins: tuple = (order, offsets, entries, q, k, v, do, stats)
    if fused and st.interpret:  # no TMA reduce-add there: a private f32 dQ per CTA and warpgroup
        outs += (jax.ShapeDtypeStruct((st.ctas, st.wgs, *q.shape), F32),)
    elif fused:  # every reader's share is added into one f32 dQ that starts at zero
        acc = jax.new_ref(jnp.zeros(q.shape, F32))
        ins += (acc,)
    res = plgpu.kernel(
        functools.partial(_dkv_kernel, st=st),
        out_type=outs,
        scratch_types=scratch,
        grid=(st.ctas,),
        grid_names=("cta",),
        num_threads=st.wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=st.approx_math),
        interpret=_mgc.interpret_params() if st.interpret else None,
    )(*ins)
    if not fused:
        return res
    dq = res[2].sum((0, 1)) if st.interpret else acc[...]
    return ((dq * st.scale).astype(dtype), *res[:2])


def _dq_static(st: Static) -> Static:
    """The forward's work items and K/V ring, with the backward's ring depth and cluster (``cluster_dq``),
    persistent CTAs."""
    t = st.tiling
    cluster = _mgc.resolve_cluster(t.cluster_dq, st)
    tiling = dataclasses.replace(t, stages=t.stages_dq, cluster=cluster, persistent=True)
    return _mgc.with_cluster(dataclasses.replace(st, tiling=tiling), cluster, persistent=True)


def _kv_static(k, entries, st: Static) -> _KVStatic:
    regions = k.shape[1] // st.w
    fused, t = st.tiling.fused_dq, st.tiling
    kst = _KVStatic(st.w, st.h, st.batch, regions, st.kv_heads, st.q_per_kv, entries.shape[-1], st.scale,
                    st.dtype, t.stages_fused if fused else t.stages_dkv, t.compute_registers,
                    t.producer_registers, t.approx_math,
                    st.interpret, 0, fused, fused and t.dq_exchange, t.dq_slots, t.dq_swizzle)
    return dataclasses.replace(kst, ctas=min(kst.items, _mgc.num_sms(st.tiling, st.interpret)))


def _longest_first(offsets, groups: int):
    """Item ids ``(b * K + kh) * R + region`` by descending reader count (ties by id: deterministic). Counts
    above ``groups`` (a region read twice by one group) are clipped: the order is a schedule, not a result."""
    readers = jnp.clip((offsets[..., 1:] - offsets[..., :-1]).reshape(-1), 0, groups)
    return stable_argsort(groups - readers, groups + 1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- entry


def prepare(st: Static, res, cotangents):
    """Everything the two passes read besides q/k/v/dO: ``(stats, sel, cnt, order, offsets, entries)``.
    ``stats`` ``[B, N, 2, T]``: the base-2 LSE and delta; with ``delta_in_dq`` (and the dQ pass running) row 1
    holds ``-dlse``, which the dQ pass completes."""
    _, _, _, regions, out, lse = res
    do, dlse = cotangents
    # lse2 is +inf where the LSE is not finite. Defensive: with the causal local block every query sees
    # itself, so its LSE is finite; a non-finite one (say a foreign forward's) makes p = exp2(s - inf) = 0,
    # not NaN.
    if st.tiling.delta_in_dq and not st.tiling.fused_dq:  # the dQ pass adds rowsum(dO O) to row 1
        lse2 = finite_lse(lse, base2=True)
        delta = -dlse.astype(F32)
    else:
        delta, lse2 = backward_row_terms(do, out, lse, dlse, base2=True)
        # The barrier keeps XLA from fusing the [B, T, N] -> [B, N, T] transpose below into this reduction
        # over 2 x T x N x H values: fused, the reduction ran at a fraction of bandwidth (H100 64K: 2.06 ms,
        # run 8).
        delta = lax.optimization_barrier(delta)
    stats = jnp.stack([lse2, delta], axis=-1).transpose(0, 2, 3, 1)  # [B, T, N, 2] -> [B, N, 2, T]
    plan = SelectionPlan(regions, block_size=st.w, merge=1)
    sel, cnt = compact_plan(plan)
    offsets, entries = transpose_plan(plan, st.kv_heads)
    return stats, sel, cnt, _longest_first(offsets, st.groups), offsets, entries


def dq_pass(st: Static, q, k, v, do, stats, sel, cnt, out):
    """``(dq, stats)``: with ``st.tiling.delta_in_dq`` the pass completes ``stats`` (``prepare`` left
    ``-dlse`` in row 1) from ``out`` and dO for the dK/dV pass; else ``stats`` comes back as given."""
    return _dq_call(q, k, v, do, stats, sel, cnt, out, _dq_static(st))


def dkv_pass(st: Static, q, k, v, do, stats, order, offsets, entries):
    """``(dk, dv)``; with ``st.tiling.fused_dq``, ``(dq, dk, dv)``."""
    return _dkv_call(q, k, v, do, stats, order, offsets, entries, _kv_static(k, entries, st))


def attend_bwd(st: Static, res, cotangents):
    """The custom VJP's backward: ``(dq, dk, dv, None)`` from the forward's residuals."""
    q, k, v = res[:3]
    do = cotangents[0]
    stats, sel, cnt, order, offsets, entries = prepare(st, res, cotangents)
    if st.tiling.fused_dq:
        dq, dk, dv = dkv_pass(st, q, k, v, do, stats, order, offsets, entries)
    else:
        dq, stats = dq_pass(st, q, k, v, do, stats, sel, cnt, res[4])
        dk, dv = dkv_pass(st, q, k, v, do, stats, order, offsets, entries)
    return dq, dk, dv, None
