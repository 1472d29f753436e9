"""Block-sparse flash attention for Hopper in Pallas Mosaic GPU: TMA, wgmma and warp specialisation.

This module holds the forward and the custom VJP. The backward is ``pallas_mosaic_gpu_bwd`` (a wgmma dQ pass
over the plan that reuses this module's work items and K/V producer, and a dK/dV pass over the transposed
plan); ``MosaicTiling(backward="triton")`` runs the Triton dQ and dK/dV kernels instead, which read the same
``out`` and natural-log LSE.

A work item is ``wgs`` units of 64 query rows. A unit is 64 consecutive tokens of one query head; an item's units
are ``wgs`` heads of the same kv head at the *same* tokens, so they share the plan row (selection is per kv
head), the K/V blocks and the causal structure of the local block. By default (``MosaicTiling.persistent``) one
CTA per SM loops over items, and the K/V ring, the step count and the barrier phases run on across items, so
the next item's blocks stream in while the current one finishes. Warpgroups of a CTA:

* ``wgs`` compute warpgroups (2 when G is even, else 1), one unit each: Q stays in shared memory, S = Q K^T and
  O += P V are wgmma (P from registers), online softmax in float32 registers, base-2 exponentials with
  ``log2(e) * scale`` folded into one FMA;
* one producer warpgroup that walks the plan row (scalar reads of the compacted row ``sel`` in global memory)
  and streams the selected K/V regions, then the local region, with TMA into a ``stages``-deep shared-memory
  ring. ``k_free``/``v_free`` barriers hand a slot back once every compute warpgroup has read it.

With two compute warpgroups they ping-pong (``MosaicTiling.pingpong``): a rendezvous barrier makes one
warpgroup issue its matmuls while the other runs its softmax, so tensor cores and the exponential units overlap.
Both warpgroups always walk the same number of steps (same plan row, same tokens), so the rendezvous count
matches without a drain loop. The causal mask is applied on the last step only (the local region).

``MosaicTiling.cluster`` (off by default: no gain measured) groups the CTAs of one plan row into a cluster that
TMA-multicasts each K/V block. H100 figures: experiments/results/archive/attention_h100_README.md (run 6).

Supported (else ``NotImplementedError``, so ``api`` dispatch falls through): Hopper GPU, bf16/f16, H in {64,
128}, W in {64, 128}, one selection per kv head (P == K), merge 1, causal with the local block.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from selmerge_jax.kernels.block_sparse_attention import pallas_triton as _triton
from selmerge_jax.kernels.block_sparse_attention.api import register_implementation
from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan, check_plan_inputs
from selmerge_jax.kernels.block_sparse_attention.transpose import compact_plan

__all__ = ["MosaicTiling", "block_sparse_attention_mosaic_gpu"]

_F32 = jnp.float32
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_BQ = 64  # query tokens per compute warpgroup: one wgmma M tile; S and O then take 64 f32 registers per thread


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Launch parameters. ``stages``: K/V shared-memory ring depth (W = H = 128 bf16: 64 KiB per stage)."""

    stages: int = 2
    pingpong: bool = True
    approx_math: bool = True
    # One CTA per SM looping over work items: the producer streams the next item's K/V (and the consumers
    # prefetch its Q) while the current item finishes, instead of a fresh CTA refilling an empty pipeline.
    # H100, 128K forward (run6b sweep): 8.13 ms persistent vs 8.54 ms one CTA per item.
    persistent: bool = True
    # CTAs per cluster sharing one plan row: each K/V block is fetched once per cluster and multicast into every
    # member's shared memory (TMA multicast), cutting L2 -> SM traffic by this factor. Capped at the largest
    # power of two dividing the items per plan row (64-token chunks x head pairs).
    cluster: int = 1
    compute_registers: int = 232  # per thread, with 2 compute warpgroups (setmaxnreg; producer gets 40)
    # Backward: "mosaic" (``pallas_mosaic_gpu_bwd``: wgmma dQ and dK/dV passes) or "triton" (the Triton kernels).
    backward: str = "mosaic"
    # Ring depths of the backward passes. dQ: a K/V ring like the forward's next to Q and dO tiles, so two
    # stages at W = H = 128 (three exceed shared memory); dK/dV: a ring of 64-query Q/dO chunks (32 KiB each).
    stages_dq: int = 2
    stages_dkv: int = 4
    pingpong_dq: bool = False  # ping-pong in the dQ pass: slower on the H100 (6.62 vs 5.71 ms at 64K)

    def __post_init__(self):
        for name, hi in (("stages", 4), ("stages_dq", 4), ("stages_dkv", 6)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= hi:
                raise ValueError(f"MosaicTiling.{name} must be an int in [2, {hi}], got {value!r}")
        if self.backward not in ("mosaic", "triton"):
            raise ValueError(f"MosaicTiling.backward must be 'mosaic' or 'triton', got {self.backward!r}")
        for name in ("pingpong", "approx_math", "persistent", "pingpong_dq"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MosaicTiling.{name} must be a bool, got {getattr(self, name)!r}")
        # type checks first: True == 1 and 232.0 == 232 would pass the membership tests below
        if isinstance(self.cluster, bool) or not isinstance(self.cluster, int) or self.cluster not in (1, 2, 4):
            raise ValueError(f"MosaicTiling.cluster must be 1, 2 or 4, got {self.cluster!r}")
        if (isinstance(self.compute_registers, bool) or not isinstance(self.compute_registers, int)
                or self.compute_registers not in range(24, 257, 8)):
            raise ValueError(f"MosaicTiling.compute_registers must be a multiple of 8 in [24, 256], "
                             f"got {self.compute_registers!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the kernel specialises on (hashable: a nondiff argument of the custom VJP)."""

    w: int
    h: int
    batch: int
    groups: int
    max_selected: int
    kv_heads: int
    q_per_kv: int
    wgs: int
    scale: float
    dtype: str
    tiling: MosaicTiling
    interpret: bool
    ctas: int = 0  # CTAs: one per item, or (persistent) about one per SM looping over items
    cluster: int = 1

    @property
    def chunks(self) -> int:
        return self.w // _BQ

    @property
    def subs(self) -> int:
        """Items per plan row: 64-token chunks x head groups of ``wgs`` heads."""
        return self.chunks * (self.q_per_kv // self.wgs)

    @property
    def items(self) -> int:
        return self.subs * self.groups * self.batch * self.kv_heads

    @property
    def qbufs(self) -> int:
        """Q/O staging buffers per warpgroup: two when persistent (the next item's Q loads during this one)."""
        return 2 if self.tiling.persistent else 1


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def _check_supported(q, plan: SelectionPlan, scale) -> None:
    h, w = q.shape[3], plan.block_size
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"pallas_mosaic_gpu: dtype {q.dtype} (supported: bfloat16, float16)")
    if h not in (64, 128):
        raise NotImplementedError(f"pallas_mosaic_gpu: head dim H={h} (supported: 64, 128)")
    if w not in (64, 128):
        raise NotImplementedError(f"pallas_mosaic_gpu: block_size W={w} (supported: 64, 128)")
    if plan.merge != 1:
        raise NotImplementedError(f"pallas_mosaic_gpu: merge={plan.merge} (supported: 1)")
    if plan.max_selected < 1:  # the producers read plan slot min(i, M - 1)
        raise NotImplementedError(f"pallas_mosaic_gpu: a plan with M={plan.max_selected} slots (supported: M >= 1)")
    if not (plan.causal and plan.include_local):
        raise NotImplementedError(f"pallas_mosaic_gpu: causal={plan.causal}, include_local={plan.include_local} "
                                  "(supported: causal with the local block)")
    if scale is not None and not scale > 0:
        raise NotImplementedError(f"pallas_mosaic_gpu: scale={scale} (the max trick needs scale > 0)")


def _make_static(q, k, plan, scale, tiling, interpret) -> _Static:
    kv_heads, g = check_plan_inputs(q, k, k, plan)
    if plan.kv_regions.shape[1] != kv_heads:
        raise NotImplementedError(f"pallas_mosaic_gpu: one selection per kv head (P == K = {kv_heads}), "
                                  f"got P={plan.kv_regions.shape[1]}")
    _check_supported(q, plan, scale)
    h = q.shape[3]
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    st = _Static(plan.block_size, h, q.shape[0], plan.num_groups, plan.max_selected, kv_heads, g,
                 2 if g % 2 == 0 else 1, scale, jnp.dtype(q.dtype).name, tiling, interpret)
    _check_shared_memory(st)
    cluster = math.gcd(tiling.cluster, st.subs)
    ctas = min(st.items, _num_sms(interpret) // cluster * cluster) if tiling.persistent else st.items
    return dataclasses.replace(st, ctas=ctas, cluster=cluster)


_SMEM_BYTES = 232448  # H100/H200 shared memory per block (227 KiB)


def _check_shared_memory(st: _Static) -> None:
    """Rejects ring depths whose buffers alone exceed shared memory, naming the setting (the compiler's own error
    does not). Barriers and alignment add ~3 KiB on top, so a depth that passes here can still just miss."""
    t, itemsize = st.tiling, 2
    tile = _BQ * st.h * itemsize
    kv_block = st.w * st.h * itemsize
    need = {"stages": st.wgs * (2 if t.persistent else 1) * tile + 2 * t.stages * kv_block}
    if t.backward == "mosaic":
        need["stages_dq"] = 2 * st.wgs * tile + 2 * t.stages_dq * kv_block
        need["stages_dkv"] = t.stages_dkv * (2 * tile + 2 * _BQ * 4) + 2 * (st.w // _BQ) * tile
    for name, nbytes in need.items():
        if not st.interpret and nbytes > _SMEM_BYTES:
            raise ValueError(f"MosaicTiling.{name}={getattr(t, name)} needs {nbytes} bytes of shared memory for "
                             f"W={st.w}, H={st.h} (limit {_SMEM_BYTES}); use a smaller {name}")


def _num_sms(interpret: bool) -> int:
    if interpret:
        return 3  # a few CTAs, each looping over several items
    return int(getattr(jax.devices()[0], "core_count", 132))


# ------------------------------------------------------------------------------------------------ kernel


def _rendezvous(sched):
    """Both compute warpgroups meet here (a barrier with one arrival per warpgroup)."""
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)


def _as_layout(x, layout, st: _Static):
    """Register layout hint (wgmma fragments); the interpreter has no layouts, so it gets the plain array."""
    return x if st.interpret else plgpu.layout_cast(x, layout)


def _row_stat(value, st: _Static):
    return _as_layout(jnp.full((_BQ,), value, _F32), plgpu.Layout.WGMMA.reduce(1), st)


def _bcast_rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _softmax_step(s, m_i, l_i, acc, st: _Static):
    """Online-softmax update with raw scores ``s``; ``m`` is kept in units of ``scale * log2(e)``."""
    c = st.scale * _LOG2E
    m_new = jnp.maximum(m_i, s.max(axis=1) * c)  # max commutes with a positive scale
    alpha = jnp.exp2(m_i - m_new)  # m_i = -inf on the first step: alpha = 0
    p = jnp.exp2(s * c - _bcast_rows(m_new, s.shape))
    l_i = l_i * alpha + p.sum(axis=1)
    return m_new, l_i, acc * _bcast_rows(alpha, acc.shape), p.astype(jnp.dtype(st.dtype))


def _causal_mask(s, chunk, st: _Static):
    """Local region (keys ``[g W, g W + W)``) seen by tokens ``g W + chunk * 64 + row``: key col <= token."""
    rows = _as_layout(lax.broadcasted_iota(jnp.int32, s.shape, 0), plgpu.Layout.WGMMA, st)
    cols = _as_layout(lax.broadcasted_iota(jnp.int32, s.shape, 1), plgpu.Layout.WGMMA, st)
    return jnp.where(rows + chunk * _BQ >= cols, s, -jnp.inf)


def _dot(a, b, trans_b=False):
    dims = (((1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _qk(q_smem, k_smem, sched, pingpong, st: _Static):
    """Raw scores ``Q K^T`` ``[64, W]`` f32. The Mosaic GPU interpreter's wgmma takes no transposed operand and
    no register operand, so interpret mode (tests only) multiplies loaded values; everything else is shared."""
    if st.interpret:
        s = _dot(q_smem[...], k_smem[...], trans_b=True)
        if pingpong:
            _rendezvous(sched)
        return s

    def body(s_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        if pingpong:  # our QK^T is issued: the other warpgroup may issue its PV while we wait for ours
            _rendezvous(sched)
        return s_ref[...]

    return pl.run_scoped(body, plgpu.ACC((_BQ, st.w), _F32))


def _pv(acc, p, v_smem, st: _Static):
    """``acc + P V``, P the wgmma A operand straight from registers, accumulating in place."""
    if st.interpret:
        return acc + _dot(p, v_smem[...])
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem))(plgpu.ACC.init(acc))


def _item(j, st: _Static):
    """This CTA's ``j``-th work item -> ``(b, kh, g, chunk, hgrp)``. Items run sub-tile fastest, so the CTAs
    sharing one plan row (and its K/V blocks) run side by side and hit L2; then groups, then kv heads."""
    item = _cta(st) + j * st.ctas
    sub, rest = lax.rem(item, jnp.int32(st.subs)), lax.div(item, jnp.int32(st.subs))
    g, bk = lax.rem(rest, jnp.int32(st.groups)), lax.div(rest, jnp.int32(st.groups))
    b, kh = lax.div(bk, jnp.int32(st.kv_heads)), lax.rem(bk, jnp.int32(st.kv_heads))
    return b, kh, g, lax.rem(sub, jnp.int32(st.chunks)), lax.div(sub, jnp.int32(st.chunks))


def _cta(st: _Static):
    """Linear CTA index. A cluster's CTAs get consecutive items of one plan row (``ctas`` and the items per row
    are multiples of the cluster size), so they walk the same K/V steps in lockstep and can share each copy."""
    if st.cluster == 1:
        return lax.axis_index("cta")
    return lax.axis_index("cta") * st.cluster + lax.axis_index("cluster")


def _num_items(st: _Static):
    """Items this CTA owns: ``cta, cta + ctas, ...`` (one each without ``persistent``)."""
    cta = _cta(st)
    return lax.div(jnp.int32(st.items) - cta + jnp.int32(st.ctas - 1), jnp.int32(st.ctas))


def _consumer(refs, st: _Static):
    cnt_ref, q_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free, \
        sched = refs
    wg = lax.axis_index("wg")
    pingpong = st.wgs == 2 and st.tiling.pingpong
    if st.wgs == 2:
        plgpu.set_max_registers(st.tiling.compute_registers, action="increase")
    stages, nq, n_items = st.tiling.stages, st.qbufs, _num_items(st)

    def rows(j):
        b, kh, g, chunk, hgrp = _item(j, st)
        return b, pl.ds(g * st.w + chunk * _BQ, _BQ), kh * st.q_per_kv + hgrp * st.wgs + wg

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
        if pingpong:  # finish the softmax before signalling (the compiler would otherwise sink it past the wait)
            m_i, l_i, acc, p = lax.optimization_barrier((m_i, l_i, acc, p))
            plgpu.barrier_arrive(sched)  # softmax done; the tensor cores are ours once the other arrives
        plgpu.barrier_wait(v_bar.at[slot])
        if pingpong:
            plgpu.barrier_wait(sched)
        acc = _pv(acc, p, v_smem.at[slot], st)
        plgpu.barrier_arrive(v_free.at[slot])
        return m_i, l_i, acc

    def item(j, base):
        b, kh, g, chunk, _ = _item(j, st)
        buf = lax.rem(j, jnp.int32(nq))
        q_smem = qo_smem.at[wg, buf]
        plgpu.barrier_wait(q_bar.at[wg * nq + buf])
        if nq == 2:  # prefetch the next item's Q into the other buffer once its O has been read out

            @pl.when(j + 1 < n_items)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                load_q(j + 1)

        cnt = cnt_ref[b, kh, g]
        carry = (_row_stat(-jnp.inf, st), _row_stat(0.0, st),
                 _as_layout(jnp.zeros((_BQ, st.h), _F32), plgpu.Layout.WGMMA, st))
        carry = lax.fori_loop(base, base + cnt, lambda i, c: step(i, c, q_smem, chunk), carry)  # selected
        m_i, l_i, acc = step(base + cnt, carry, q_smem, chunk, masked=True)  # local region: causal
        b, t_rows, head = rows(j)
        _store(acc, m_i, l_i, q_smem, lse_smem.at[wg], o_ref.at[b, t_rows, head], lse_ref.at[b, head, t_rows], st)
        return base + cnt + 1

    if pingpong:
        pl.when(wg == 1)(lambda: _rendezvous(sched))  # warpgroup 1 runs half a step behind warpgroup 0
    load_q(0)
    lax.fori_loop(0, n_items, item, jnp.int32(0))
    if pingpong:
        pl.when(wg == 0)(lambda: _rendezvous(sched))  # balances warpgroup 1's extra rendezvous
    plgpu.wait_smem_to_gmem(0)


def _store(acc, m_i, l_i, o_smem, lse_smem, o_gmem, lse_gmem, st: _Static):
    """O = acc / l and LSE (natural log) through shared memory, written back with TMA (not awaited)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's LSE row has left lse_smem
    o_smem[...] = (acc * _bcast_rows(1.0 / l_i, acc.shape)).astype(jnp.dtype(st.dtype))
    lse_smem[...] = m_i * _LN2 + jnp.log(l_i)  # m is in log2 units
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)


def _producer(refs, st: _Static):
    sel_ref, cnt_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free = refs
    if st.wgs == 2:
        plgpu.set_max_registers(40, action="decrease")
    stages = st.tiling.stages

    def item(j, base):
        b, kh, g, _, _ = _item(j, st)
        cnt = cnt_ref[b, kh, g]

        @pl.loop(0, cnt + 1)
        def _(i):
            slot, first_use = lax.rem(base + i, jnp.int32(stages)), base + i < stages
            # Steps [0, cnt) read the compacted plan row; step cnt is the group's own (local) region.
            region = jnp.where(i < cnt, sel_ref[b, kh, g, jnp.minimum(i, st.max_selected - 1)], g)
            src_rows = (b, pl.ds(region * st.w, st.w), kh)
            for src, dst, full, free in ((k_ref, k_smem, k_bar, k_free), (v_ref, v_smem, v_bar, v_free)):
                # With a cluster the slot is free once every member's consumers released it (cluster barrier).
                pl.when(~first_use)(functools.partial(plgpu.barrier_wait, free.at[slot]))
                plgpu.copy_gmem_to_smem(src.at[src_rows], dst.at[slot], full.at[slot],
                                        collective_axes="cluster" if st.cluster > 1 else None)

        return base + cnt + 1

    total = lax.fori_loop(0, _num_items(st), item, jnp.int32(0))

    # Observe the last releases too: every barrier phase then has been waited for when shared memory goes
    # away (the interpreter checks this; on the GPU it costs nothing, the consumers are about to finish).
    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def _kernel(sel_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem,
            q_bar, k_bar, v_bar, k_free, v_free, sched, *, st: _Static):
    wg = lax.axis_index("wg")
    consumer_refs = (cnt_ref, q_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_bar, k_bar,
                     v_bar, k_free, v_free, sched)
    pl.when(wg < st.wgs)(lambda: _consumer(consumer_refs, st))
    producer_refs = (sel_ref, cnt_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free)
    pl.when(wg == st.wgs)(lambda: _producer(producer_refs, st))


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private: tests only

    return InterpretGPUParams()


def _forward(q, k, v, sel, cnt, st: _Static):
    b, t, n, h = q.shape
    dtype, stages, nq = q.dtype, st.tiling.stages, st.qbufs
    smem = lambda shape: plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                                              plgpu.SwizzleTransform(128)))
    ring_free = lambda: (  # one arrival per consumer warpgroup (of every cluster member)
        plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=st.wgs, num_barriers=stages)
        if st.cluster > 1 else plgpu.Barrier(num_arrivals=st.wgs, num_barriers=stages))
    scratch = (
        smem((st.wgs, nq, _BQ, h)), smem((stages, st.w, h)), smem((stages, st.w, h)),
        plgpu.SMEM((st.wgs, _BQ), _F32),
        plgpu.Barrier(num_barriers=st.wgs * nq), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages), ring_free(), ring_free(), plgpu.Barrier(num_arrivals=st.wgs),
    )
    kernel = plgpu.kernel(
        functools.partial(_kernel, st=st),
        out_type=(_triton._out_struct(q.shape, dtype, q), _triton._out_struct((b, n, t), _F32, q)),
        scratch_types=scratch,
        grid=(st.ctas // st.cluster,),
        grid_names=("cta",),
        **({"cluster": (st.cluster,), "cluster_names": ("cluster",)} if st.cluster > 1 else {}),
        num_threads=st.wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=st.tiling.approx_math),
        interpret=_interpret_params() if st.interpret else None,
    )
    out, lse_nt = kernel(sel, cnt, q, k, v)
    # [B, N, T] lets each warpgroup write its 64 LSE values as one contiguous TMA row; the Triton convention
    # (and the backward) is [B, T, N].
    return out, jnp.swapaxes(lse_nt, 1, 2)


# ------------------------------------------------------------------------------------------ custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, regions, st: _Static, tst):
    sel, cnt = compact_plan(SelectionPlan(regions, block_size=st.w, merge=1))
    return _forward(q, k, v, sel, cnt, st)


def _attend_fwd(q, k, v, regions, st, tst):
    out, lse = _attend(q, k, v, regions, st, tst)
    return (out, lse), (q, k, v, regions, out, lse)


def _attend_bwd(st, tst, res, cotangents):
    if st.tiling.backward == "triton":
        return _triton._attend_bwd(tst, res, cotangents)  # the Triton dQ and dK/dV kernels read our out and LSE
    from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu_bwd  # imports this module

    return pallas_mosaic_gpu_bwd.attend_bwd(st, res, cotangents)


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_sparse_attention_mosaic_gpu(q, k, v, plan: SelectionPlan, *, scale: float | None = None,
                                      return_lse: bool = False, tiling: MosaicTiling | None = None,
                                      backward_tiling: "_triton.TritonTiling | None" = None,
                                      interpret: bool = False):
    """Block-sparse attention with the Mosaic GPU kernels (same contract as the reference).

    Args:
      q, k, v, plan, scale, return_lse: as ``block_sparse_attention_reference``.
      tiling: forward launch parameters (``MosaicTiling()`` by default).
      backward_tiling: the Triton backward's tiling, used with ``MosaicTiling(backward="triton")``.
      interpret: run the forward in the Mosaic GPU interpreter and the backward in the Pallas interpreter
        (CPU; slow, for tests).

    Raises:
      NotImplementedError: not on a Hopper GPU (and not interpreting), or inputs outside the supported set
        (see the module docstring); the dispatcher then falls through to the next implementation.
    """
    if not interpret and not _is_hopper():
        raise NotImplementedError(f"pallas_mosaic_gpu needs a Hopper GPU (sm_90), running on "
                                  f"{jax.devices()[0].device_kind!r}")
    varying = getattr(getattr(jax.typeof(q), "manual_axis_type", None), "varying", ())
    if varying:  # ring attention's shard_map: never run there yet, so leave it to the Triton kernels
        raise NotImplementedError(f"pallas_mosaic_gpu is untested inside shard_map (q varies over {set(varying)})")
    check_plan_inputs(q, k, v, plan)
    st = _make_static(q, k, plan, scale, tiling or MosaicTiling(), bool(interpret))
    tst = None  # the Triton backward's statics only when it runs (it packs power-of-two head counts only)
    if st.tiling.backward == "triton":
        tst = _triton._make_static(q, k, plan, scale, backward_tiling or _triton.TritonTiling(), bool(interpret))
    out, lse = _attend(q, k, v, plan.kv_regions.astype(jnp.int32), st, tst)
    return (out, lse) if return_lse else out


def _dispatch(q, k, v, plan, *, scale=None, return_lse=False):
    return block_sparse_attention_mosaic_gpu(q, k, v, plan, scale=scale, return_lse=return_lse)


register_implementation("pallas_mosaic_gpu", _dispatch)
