"""Block-sparse flash attention for Hopper in Pallas Mosaic GPU: TMA, wgmma and warp specialisation.

This module holds the forward, the custom VJP and the entry point. The backward is ``pallas_mosaic_gpu_bwd``
(a wgmma dQ pass over the plan with the forward's work items and K/V producer, and a dK/dV pass over the
transposed plan); ``MosaicTiling(backward="triton")`` runs the Triton dQ and dK/dV kernels instead
(``pallas_triton``'s ``attend_bwd``), which read the same ``out`` and natural-log LSE. What forward and
backward share (tiling, statics, work items, the K/V producer) is ``pallas_mosaic_gpu_common``; imports run
one way: this module -> ``pallas_mosaic_gpu_bwd`` -> ``pallas_mosaic_gpu_common``.

A work item is ``wgs`` units of 64 query rows. A unit is 64 consecutive tokens of one query head; an item's
units are ``wgs`` heads of the same kv head at the *same* tokens, so they share the plan row (selection is per
kv head), the K/V blocks and the causal structure of the local block. At odd G (multi-head attention) with
128-token regions the units are instead the two 64-token chunks of one head (``MosaicTiling.pair_chunks``):
the same plan row and K/V blocks, each warpgroup masking the local block for its own chunk. By default
(``MosaicTiling.persistent``) one CTA per SM loops over items, and the K/V ring, the step count and the
barrier phases run on across items, so the next item's blocks stream in while the current one finishes.
Warpgroups of a CTA:

* ``wgs`` compute warpgroups (2 when G is even or chunks pair up, else 1), one unit each: Q stays in shared
  memory, S = Q K^T and O += P V are wgmma (P from registers), online softmax in float32 registers, base-2
  exponentials with ``log2(e) * scale`` folded into one FMA;
* one producer warpgroup that walks the plan row (scalar reads of the compacted row ``sel`` in global memory)
  and streams the selected K/V regions, then the local region, with TMA into a ``stages``-deep shared-memory
  ring. ``k_free``/``v_free`` barriers hand a slot back once every compute warpgroup has read it.

Each compute warpgroup overlaps its own matmuls with its softmax (``MosaicTiling.overlap``, the default;
FA3's intra-warpgroup overlap): step ``i`` issues ``S_i = Q K_i^T`` and then ``O += P_{i-1} V_{i-1}``, waits
for ``S_i`` only, and runs the softmax of step ``i`` while the P V product is still on the tensor cores; O
lives in a wgmma accumulator and is rescaled once that product is done. The producer issues each V block one
step after its K block, the order they are consumed in. Without ``overlap`` the step is S, softmax, P V in
turn, and the two warpgroups ping-pong (``MosaicTiling.pingpong``): a rendezvous barrier makes one issue its
matmuls while the other runs its softmax. Both warpgroups always walk the same number of steps (same plan
row, same tokens), so barrier counts match without a drain loop. The causal mask is applied on the last step
only (the local region); in the overlapped forward a unit's first 64-token chunk of a 128-token region
multiplies only the region's first 64 keys there, the only ones it sees.

``MosaicTiling.cluster`` groups the CTAs of one plan row into a cluster that TMA-multicasts each K/V block
(``cluster_dq`` does the same in the dQ pass): by default 2-CTA clusters from 128K tokens up (figures in
``MosaicTiling``).

Supported (else ``NotImplementedError``, so ``api`` dispatch falls through): Hopper GPU, bf16/f16, H in {64,
128}, W in {64, 128}, one selection per kv head (P == K), merge 1, causal with the local block.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from selmerge_jax.kernels import target
from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu_bwd as _bwd
from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu_common as _mgc
from selmerge_jax.kernels.block_sparse_attention import pallas_triton
from selmerge_jax.kernels.block_sparse_attention._common import (
    F32,
    LN2,
    LOG2E,
    dot,
    named_residuals,
    out_struct,
)
from selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu_common import (
    BQ,
    MosaicTiling,
    Static,
    make_static,
)
from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan, check_plan_inputs
from selmerge_jax.kernels.block_sparse_attention.transpose import compact_plan

# ``make_static`` and ``_attend`` are the pieces ``experiments/benchmarks/bench_attention.py`` times apart.
__all__ = ["MosaicTiling", "block_sparse_attention_mosaic_gpu", "make_static"]


# ------------------------------------------------------------------------------------------------ kernel


def _row_stat(value, st: Static):
    return _mgc.as_layout(jnp.full((BQ,), value, F32), plgpu.Layout.WGMMA.reduce(1), st)


def _softmax_step(s, m_i, l_i, acc, st: Static):
    """Online-softmax update with raw scores ``s``; ``m`` is kept in units of ``scale * log2(e)``."""
    c = st.scale * LOG2E
    m_new = jnp.maximum(m_i, s.max(axis=1) * c)  # max commutes with a positive scale
    alpha = jnp.exp2(m_i - m_new)  # m_i = -inf on the first step: alpha = 0
    p = jnp.exp2(s * c - _mgc.bcast_rows(m_new, s.shape))
    l_i = l_i * alpha + p.sum(axis=1)
    return m_new, l_i, acc * _mgc.bcast_rows(alpha, acc.shape), p.astype(jnp.dtype(st.dtype))


def _causal_mask(s, chunk, st: Static):
    """Local region (keys ``[g W, g W + W)``) seen by tokens ``g W + chunk * 64 + row``: key col <= token."""
    rows = _mgc.as_layout(lax.broadcasted_iota(jnp.int32, s.shape, 0), plgpu.Layout.WGMMA, st)
    cols = _mgc.as_layout(lax.broadcasted_iota(jnp.int32, s.shape, 1), plgpu.Layout.WGMMA, st)
    return jnp.where(rows + chunk * BQ >= cols, s, -jnp.inf)


def _qk(q_smem, k_smem, sched, pingpong, st: Static):
    """Raw scores ``Q K^T`` ``[64, W]`` f32. The Mosaic GPU interpreter's wgmma takes no transposed operand
    and no register operand, so interpret mode (tests only) multiplies loaded values; everything else is
    shared."""
    if st.interpret:
        s = dot(q_smem[...], k_smem[...], trans_b=True)
        if pingpong:
            _mgc.rendezvous(sched)
        return s

    def body(s_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        if pingpong:  # our QK^T is issued: the other warpgroup may issue its PV while we wait for ours
            _mgc.rendezvous(sched)
        return s_ref[...]

    return pl.run_scoped(body, plgpu.ACC((BQ, st.w), F32))


def _consumer(refs, st: Static):
    cnt_ref, q_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free, \
        sched = refs
    wg = lax.axis_index("wg")
    pingpong = st.wgs == 2 and st.tiling.pingpong
    if st.wgs == 2:
        plgpu.set_max_registers(st.tiling.compute_registers, action="increase")
    stages, nq, n_items = st.tiling.stages, st.qbufs, _mgc.num_items(st)

    def rows(j):
        b, _, g, chunk, head = _mgc.unit(j, wg, st)
        return b, pl.ds(g * st.w + chunk * BQ, BQ), head

    def load_q(j):
        buf = lax.rem(j, jnp.int32(nq))
        plgpu.copy_gmem_to_smem(q_ref.at[rows(j)], qo_smem.at[wg, buf], q_bar.at[wg * nq + buf])

    def step(i, carry, q_smem, chunk, masked=False):
        """Global step ``i`` (counted across this CTA's items, as the producer counts them)."""
        m_i, l_i, acc = carry
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])
        s = _qk(q_smem, k_smem.at[slot], sched, pingpong, st)
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
            s = _causal_mask(s, chunk, st)
        m_i, l_i, acc, p = _softmax_step(s, m_i, l_i, acc, st)
        # finish the softmax before signalling (the compiler would otherwise sink it past the wait)
        if pingpong:
            m_i, l_i, acc, p = lax.optimization_barrier((m_i, l_i, acc, p))
            plgpu.barrier_arrive(sched)  # softmax done; the tensor cores are ours once the other arrives
        plgpu.barrier_wait(v_bar.at[slot])
        if pingpong:
            plgpu.barrier_wait(sched)
        acc = _mgc.pv(acc, p, v_smem.at[slot], st)
        plgpu.barrier_arrive(v_free.at[slot])
        return m_i, l_i, acc

    def plain_steps(q_smem, base, cnt, chunk):
        """The item's steps without ``overlap``: S, softmax, P V in turn (the rendezvous ping-pong)."""
        carry = (_row_stat(-jnp.inf, st), _row_stat(0.0, st),
                 _mgc.as_layout(jnp.zeros((BQ, st.h), F32), plgpu.Layout.WGMMA, st))
        carry = lax.fori_loop(base, base + cnt, lambda i, c: step(i, c, q_smem, chunk), carry)  # selected
        return step(base + cnt, carry, q_smem, chunk, masked=True)  # local region: causal

    def item(j, base):
        b, kh, g, chunk, _ = _mgc.unit(j, wg, st)
        buf = lax.rem(j, jnp.int32(nq))
        q_smem = qo_smem.at[wg, buf]
        plgpu.barrier_wait(q_bar.at[wg * nq + buf])
        if nq == 2:  # prefetch the next item's Q into the other buffer once its O has been read out

            @pl.when(j + 1 < n_items)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                load_q(j + 1)

        cnt = cnt_ref[b, kh, g]
        if st.tiling.overlap:
            m_i, l_i, acc = _overlapped_item(q_smem, k_smem, v_smem, (k_bar, v_bar, k_free, v_free),
                                             sched if pingpong else None, base, cnt, chunk, st)
        else:
            m_i, l_i, acc = plain_steps(q_smem, base, cnt, chunk)
        b, t_rows, head = rows(j)
        _store(acc, m_i, l_i, q_smem, lse_smem.at[wg], o_ref.at[b, t_rows, head], lse_ref.at[b, head, t_rows],
               st)
        return base + cnt + 1

    # Ping-pong start and end. Rendezvous: warpgroup 1 runs half a step behind warpgroup 0, and warpgroup 0
    # balances that extra meeting at the end. Turns (``overlap``): warpgroup 0 takes the first, and observes
    # warpgroup 1's last hand-over at the end (every barrier phase is waited for).
    if pingpong:
        if st.tiling.overlap:
            pl.when(wg == 1)(lambda: plgpu.barrier_arrive(sched.at[0]))
        else:
            pl.when(wg == 1)(lambda: _mgc.rendezvous(sched))
    load_q(0)
    lax.fori_loop(0, n_items, item, jnp.int32(0))
    if pingpong:
        if st.tiling.overlap:
            pl.when(wg == 0)(lambda: plgpu.barrier_wait(sched.at[0]))
        else:
            pl.when(wg == 0)(lambda: _mgc.rendezvous(sched))
    plgpu.wait_smem_to_gmem(0)


def _overlapped_item(q_smem, k_smem, v_smem, ring, turns, base, cnt, chunk, st: Static):
    """One unit's ``cnt + 1`` steps with FA3's intra-warpgroup overlap (``MosaicTiling.overlap``): step ``i``
    issues ``S_i = Q K_i^T`` and then ``O += P_{i-1} V_{i-1}``, waits for ``S_i`` only and runs its softmax
    while the P V product is still on the tensor cores; ``O`` is rescaled once that product is done. With
    ``turns`` (one barrier per warpgroup) the two warpgroups take turns issuing. -> ``(m, l, acc)`` as the
    plain step loop's.

    The last step is the local region, causal. A unit's first 64-token chunk of a 128-token region sees only
    the region's first 64 keys there, so that step multiplies those alone (half the local block's matmuls and
    exponentials). When the row selects nothing the local region is step 0, at full width.

    ``O`` lives in a wgmma accumulator (``o_ref``) so that its product can stay in flight; the interpreter
    has no accumulators, so there ``O`` is carried as a value (``acc``, None on the GPU) and the products are
    plain dots."""
    k_bar, v_bar, k_free, v_free = ring
    stages, c, wg, last = st.tiling.stages, st.scale * LOG2E, lax.axis_index("wg"), base + cnt
    dtype = jnp.dtype(st.dtype)
    ring_slot = lambda i: lax.rem(i, jnp.int32(stages))
    keys = functools.partial(_mgc.key_rows, st=st)

    def take_turn():
        if turns is not None:
            plgpu.barrier_wait(turns.at[wg])

    def pass_turn():
        if turns is not None:
            plgpu.barrier_arrive(turns.at[1 - wg])

    def issue(o_ref, acc, slot, n=st.w, prev=None, p=None):
        """Issue S over the first ``n`` keys of ``slot`` (and P V for ``prev``) in this warpgroup's turn ->
        ``(S, acc)``."""
        if st.interpret:
            s = dot(q_smem[...], keys(k_smem, slot, n)[...], trans_b=True)
            take_turn()
            pass_turn()
            return s, (acc if p is None else acc + dot(p, v_smem.at[prev][...]))

        def body(s_ref):
            take_turn()
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(keys(k_smem, slot, n), (1, 0)))
            if p is not None:
                plgpu.wgmma(o_ref, p, v_smem.at[prev])
            pass_turn()
            return plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if p is None else 1)  # S only

        return pl.run_scoped(body, plgpu.ACC((BQ, n), F32)), acc

    def pv_done(o_ref, acc):
        return acc if st.interpret else plgpu.wgmma_accumulator_load(o_ref, wait_n=0)

    def step(o_ref, i, carry, n=st.w, masked=False):
        """Ring step ``i`` after the first: S_i over ``n`` keys beside P_{i-1} V_{i-1}, then S_i's softmax."""
        m_i, l_i, p, acc = carry
        slot, prev = ring_slot(i), ring_slot(i - 1)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[prev])
        s, acc = issue(o_ref, acc, slot, n, prev, p)
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
            s = _causal_mask(s, chunk, st)
        m_new = jnp.maximum(m_i, s.max(axis=1) * c)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * c - _mgc.bcast_rows(m_new, s.shape))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = pv_done(o_ref, acc) * _mgc.bcast_rows(alpha, (BQ, st.h))  # P_{i-1} V_{i-1} is done
        plgpu.barrier_arrive(v_free.at[prev])
        if not st.interpret:
            o_ref[...], acc = acc, None
        return m_new, l_i, p.astype(dtype), acc

    def finish(o_ref, carry, n):
        """The last P V (over ``n`` keys of the last slot) -> ``(m, l, acc)``."""
        m_i, l_i, p, acc = carry
        slot = ring_slot(last)
        plgpu.barrier_wait(v_bar.at[slot])
        take_turn()
        if st.interpret:
            acc = acc + dot(p, keys(v_smem, slot, n)[...])
        else:
            plgpu.wgmma(o_ref, p, keys(v_smem, slot, n))
        pass_turn()
        acc = pv_done(o_ref, acc)
        plgpu.barrier_arrive(v_free.at[slot])
        return m_i, l_i, acc

    def local_last(o_ref, carry, n):
        return finish(o_ref, step(o_ref, last, carry, n, masked=True), n)

    def steps(o_ref):
        acc = jnp.zeros((BQ, st.h), F32) if st.interpret else None
        slot = ring_slot(base)
        plgpu.barrier_wait(k_bar.at[slot])
        s, acc = issue(o_ref, acc, slot)
        plgpu.barrier_arrive(k_free.at[slot])
        s = lax.cond(cnt == 0, lambda s: _causal_mask(s, chunk, st), lambda s: s, s)  # step 0 is local
        m_i = s.max(axis=1) * c
        p = jnp.exp2(s * c - _mgc.bcast_rows(m_i, s.shape))
        carry = (m_i, p.sum(axis=1), p.astype(dtype), acc)
        carry = lax.fori_loop(base + 1, last, lambda i, cr: step(o_ref, i, cr), carry)  # selected regions
        if st.chunks == 2:  # the first chunk's local step over the region's first 64 keys only
            last_step = lambda cr: lax.cond(chunk == 0, lambda cr: local_last(o_ref, cr, BQ),
                                            lambda cr: local_last(o_ref, cr, st.w), cr)
        else:
            last_step = lambda cr: local_last(o_ref, cr, st.w)
        return lax.cond(cnt == 0, lambda cr: finish(o_ref, cr, st.w), last_step, carry)

    if st.interpret:
        return steps(None)
    return pl.run_scoped(steps, plgpu.ACC((BQ, st.h), F32))


def _store(acc, m_i, l_i, o_smem, lse_smem, o_gmem, lse_gmem, st: Static):
    """O = acc / l and LSE (natural log) through shared memory, written back with TMA (not awaited)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's LSE row has left lse_smem
    o_smem[...] = (acc * _mgc.bcast_rows(1.0 / l_i, acc.shape)).astype(jnp.dtype(st.dtype))
    lse_smem[...] = m_i * LN2 + jnp.log(l_i)  # m is in log2 units
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)


def _kernel(sel_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem,
            q_bar, k_bar, v_bar, k_free, v_free, sched, *, st: Static):
    wg = lax.axis_index("wg")
    consumer_refs = (cnt_ref, q_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_bar, k_bar,
                     v_bar, k_free, v_free, sched)
    pl.when(wg < st.wgs)(lambda: _consumer(consumer_refs, st))
    producer_refs = (sel_ref, cnt_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free)
    pl.when(wg == st.wgs)(lambda: _mgc.kv_producer(producer_refs, st, v_lag=st.tiling.overlap))


def _forward(q, k, v, sel, cnt, st: Static):
    b, t, n, h = q.shape
    dtype, stages, nq = q.dtype, st.tiling.stages, st.qbufs
    smem = functools.partial(_mgc.smem, dtype=dtype)
    scratch = (
        smem((st.wgs, nq, BQ, h)), smem((stages, st.w, h)), smem((stages, st.w, h)),
        plgpu.SMEM((st.wgs, BQ), F32),
        plgpu.Barrier(num_barriers=st.wgs * nq), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages), _mgc.ring_free(st, stages), _mgc.ring_free(st, stages),
        # the ping-pong: one rendezvous barrier, or with ``overlap`` one turn barrier per warpgroup
        plgpu.Barrier(num_barriers=2) if st.tiling.overlap else plgpu.Barrier(num_arrivals=st.wgs),
    )
    kernel = plgpu.kernel(
        functools.partial(_kernel, st=st),
        out_type=(out_struct(q.shape, dtype, q), out_struct((b, n, t), F32, q)),
        scratch_types=scratch,
        **_mgc.launch_grid(st),
        num_threads=st.wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=st.tiling.approx_math),
        interpret=_mgc.interpret_params() if st.interpret else None,
    )
    out, lse_nt = kernel(sel, cnt, q, k, v)
    # [B, N, T] lets each warpgroup write its 64 LSE values as one contiguous TMA row; the Triton convention
    # (and the backward) is [B, T, N].
    return out, jnp.swapaxes(lse_nt, 1, 2)


# ------------------------------------------------------------------------------------------ custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, regions, st: Static, tst):
    sel, cnt = compact_plan(SelectionPlan(regions, block_size=st.w, merge=1))
    return _forward(q, k, v, sel, cnt, st)


def _attend_fwd(q, k, v, regions, st, tst):
    out, lse = _attend(q, k, v, regions, st, tst)
    out, lse = named_residuals(out, lse)  # what the model's remat="save" keeps
    return (out, lse), (q, k, v, regions, out, lse)


def _attend_bwd(st, tst, res, cotangents):
    if st.tiling.backward == "triton":
        # the Triton dQ and dK/dV kernels read our out, LSE
        return pallas_triton.attend_bwd(tst, res, cotangents)
    return _bwd.attend_bwd(st, res, cotangents)


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_sparse_attention_mosaic_gpu(q, k, v, plan: SelectionPlan, *, scale: float | None = None,
                                      return_lse: bool = False, tiling: MosaicTiling | None = None,
                                      backward_tiling: pallas_triton.TritonTiling | None = None,
                                      interpret: bool = False):
    """Block-sparse attention with the Mosaic GPU kernels (same contract as the reference).

    Args:
      q, k, v, plan, scale, return_lse: as ``block_sparse_attention_reference``.
      tiling: forward launch parameters (``MosaicTiling()`` by default).
      backward_tiling: the Triton backward's tiling, used with ``MosaicTiling(backward="triton")``.
      interpret: run the kernels in the Mosaic GPU interpreter (the Triton backward in the Pallas interpreter;
        CPU, slow, for tests; ``tiling.interpret_ctas`` persistent CTAs).

    Raises:
      NotImplementedError: not on a Hopper GPU (and not interpreting), or inputs outside the supported set
        (see the module docstring); the dispatcher then falls through to the next implementation.
    """
    if not interpret and not _mgc.is_hopper():
        raise NotImplementedError(f"pallas_mosaic_gpu needs a Hopper GPU (sm_90), tracing for "
                                  f"{target.platform()!r} (compute capability {target.compute_capability()})")
    varying = getattr(getattr(jax.typeof(q), "manual_axis_type", None), "varying", ())
    if varying:  # ring attention's shard_map: never run there yet, so leave it to the Triton kernels
        raise NotImplementedError("pallas_mosaic_gpu is untested inside shard_map (q "
                                  f"varies over {set(varying)})")
    check_plan_inputs(q, k, v, plan)
    st = make_static(q, k, plan, scale, tiling or MosaicTiling(), bool(interpret))
    tst = None  # the Triton backward's statics only when it runs (it packs power-of-two head counts only)
    if st.tiling.backward == "triton":
        tst = pallas_triton.make_static(q, k, plan, scale, backward_tiling or pallas_triton.TritonTiling(),
                                        bool(interpret))
    out, lse = _attend(q, k, v, plan.kv_regions.astype(jnp.int32), st, tst)
    return (out, lse) if return_lse else out


IMPLEMENTATION = block_sparse_attention_mosaic_gpu  # what ``api`` registers as "pallas_mosaic_gpu"
