"""What the Mosaic GPU forward (``pallas_mosaic_gpu``) and backward (``pallas_mosaic_gpu_bwd``) kernels share.

Launch parameters and statics, the supported-input checks, the shared-memory budget of every pass, the
work-item schedule of the persistent CTAs (a forward item and a dQ item are the same 64-query tile), the
plan-row K/V producer warpgroup (the forward's and the dQ pass's), and the small register helpers both
consumers use. Both kernel modules import this one and the backward never imports the forward, so the
dependency runs one way: ``pallas_mosaic_gpu`` -> ``pallas_mosaic_gpu_bwd`` -> this module -> ``_common``.
"""

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from selmerge_jax.kernels import target
from selmerge_jax.kernels.block_sparse_attention._common import dot
from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan, check_plan_inputs

# optional dependency: the Mosaic GPU interpreter's params live in a private jax module (interpret mode only)
try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover
    InterpretGPUParams = None

__all__ = ["BQ", "SMEM_BYTES", "MosaicTiling", "Static", "as_layout", "bcast_rows", "check_shared_memory",
           "check_supported", "cta", "interpret_params", "is_hopper", "key_rows", "kv_producer",
           "launch_grid", "make_static", "num_items", "num_sms", "pv", "rendezvous", "resolve_cluster",
           "ring_free", "smem", "unit", "with_cluster", "work_item"]

BQ = 64  # query tokens per compute warpgroup: one wgmma M tile; S and O then take 64 f32 registers per thread


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Launch parameters. ``stages``: K/V shared-memory ring depth (W = H = 128 bf16: 64 KiB per stage)."""

    stages: int = 2
    # FA3's intra-warpgroup overlap in the forward: each step issues the next block's Q K^T before the
    # current P V is done and runs its softmax while that product is on the tensor cores (two accumulators
    # live: S and O); the producer issues each V block a step after its K block, in that order. The default:
    # on an H100, in one process (results R67), the 64K forward 3.79 / 3.76 / 3.97 ms against 3.93 / 4.04 /
    # 3.92 ms with the ping-pong below, the 128K forward 7.69 / 7.62 / 7.54 ms against 8.23 / 8.28 / 7.91 ms;
    # with the first chunk's local step over 64 keys (R68) 3.64 / 3.62 ms against 3.93 / 3.92 ms at 64K.
    overlap: bool = True
    # The two compute warpgroups' ping-pong. Without ``overlap``: a rendezvous barrier makes one warpgroup
    # issue its matmuls while the other runs its softmax (without it that forward is 6-10% slower, R67). With
    # ``overlap``: the warpgroups take turns issuing (a barrier each, FA3's scheduler barrier), which only
    # costs there (R67): off by default.
    pingpong: bool = False
    approx_math: bool = True
    # One CTA per SM looping over work items: the producer streams the next item's K/V (and the consumers
    # prefetch its Q) while the current item finishes, instead of a fresh CTA refilling an empty pipeline.
    # H100, 128K forward (run6b sweep): 8.13 ms persistent vs 8.54 ms one CTA per item.
    persistent: bool = True
    # CTAs per cluster sharing one plan row: each K/V block is fetched once per cluster and multicast into
    # every member's shared memory (TMA multicast), cutting L2 -> SM traffic by this factor. Capped at the
    # largest power of two dividing the items per plan row (``Static.subs``). ``cluster_dq``: the same for the
    # dQ pass, whose producer streams the same plan rows' K/V blocks (``kv_producer``). None (the default):
    # 2 from ``CLUSTER_FROM_TOKENS`` tokens a sequence up, else 1 (always 1 in the interpreter, which has no
    # cluster barriers). H100 (results R75, R76): at 1M tokens 2-CTA clusters make the forward 7.5% faster
    # (61.8 / 61.4 ms against 66.3 / 66.7 ms) and the layer's gradients 309.4 / 308.9 ms on the device against
    # 332.7 / 333.3 ms (both passes clustered), A/B/A/B; at 128K forward + backward 36.39 / 36.09 ms against
    # 36.30 / 37.35 ms (within the spread); at 64K 17.94 / 18.51 ms against 17.21 / 17.42 ms (slower).
    # At this default (R77) the 1M dQ pass takes 90.47 ms against 105.84 ms unclustered (R71), the layer's
    # gradients 302.8 ms on the device against 329.3 ms. 4-CTA clusters slow the 1M forward to 112 ms. At 1M
    # the passes run at the GPU's 700 W power cap (SM clock 1.1-1.5 GHz instead of 1.98, nvidia-smi in R76):
    # multicast moves fewer bytes, so less power.
    cluster: int | None = None
    cluster_dq: int | None = None
    # Per thread, with 2 compute warpgroups (setmaxnreg); the producer warpgroup keeps
    # ``producer_registers``. The three share what the launch gave the CTA, 168 a thread for 384 threads
    # (504 a thread over 128 threads): more and setmaxnreg.inc waits forever; below the launch's 168,
    # setmaxnreg.inc is undefined. 240 + 240 + 24 by default (FA3's split): it cuts what ptxas spills in the
    # two backward passes from 340-384 bytes a thread (at 232 + 232 + 40) to 8. At 1M tokens on an H100 the
    # forward is 3.3% faster and the dK/dV pass 5.4-5.9% (the passes 311.3 against 321.3-321.6 ms, results
    # R59); at 64K forward + backward on an H100, 17.38 and 17.58 ms against 18.85 ms at 232 (R60; on the H200
    # within run-to-run spread, R52). The gpu-marked suite passed at 240 (R60).
    compute_registers: int = 240
    # Backward: "mosaic" (``pallas_mosaic_gpu_bwd``: wgmma dQ and dK/dV passes) or "triton" (the Triton
    # kernels).
    backward: str = "mosaic"
    # Ring depths of the backward passes. dQ: a K/V ring like the forward's next to Q and dO tiles, so two
    # stages at W = H = 128 (three exceed shared memory); dK/dV: a ring of 64-query Q/dO chunks (32 KiB each).
    stages_dq: int = 2
    stages_dkv: int = 4
    pingpong_dq: bool = False  # ping-pong in the dQ pass: slower on the H100 (6.62 vs 5.71 ms at 64K)
    # The dQ pass defers each step's dQ product: step i issues dQ += dS_{i-1} K_{i-1}, then S_i = Q K_i^T and
    # dP_i = dO V_i^T, so the three run back to back on the tensor cores instead of the warpgroup waiting
    # for dQ and only then issuing the next block's pair; the first chunk's local step runs over 64 keys (as
    # the forward's). Not with ``pingpong_dq``. Off: no faster on an H100 (R71), A/B/A/B forward + backward
    # at 64K 18.4686 / 18.5547 ms against 18.1271 / 18.4728 ms plain, at 128K 37.1928 / 37.9455 ms against
    # 36.9482 / 36.9168 ms; the 1M dQ pass 103.33 ms against 105.84 ms (separate processes). ptxas spills
    # more in it (a deviceless compile: 476 against 328 bytes a thread).
    overlap_dq: bool = False
    # The dQ pass computes delta = rowsum(dO * O) itself (dO from its tile, O from global memory into
    # registers) and writes the per-query stats the dK/dV pass reads, instead of an XLA reduction over dO and
    # O before the passes. Off: on an H100 (R73) the 1M backward's preparation takes 0.90 ms instead of 6.62
    # ms, but forward + backward A/B/A/B loses 2.2% at 64K (18.26 / 18.32 ms against 17.87 / 17.93 ms) and
    # gains 1.6% at 128K (36.93 / 36.56 ms against 37.38 / 37.29 ms).
    delta_in_dq: bool = False
    # dQ inside the dK/dV pass (off): per 64-query chunk each compute warpgroup adds dS K into an f32 dQ in
    # global memory by TMA reduce-add. Five matmuls per block pair instead of the two passes' seven, and the
    # order of the f32 additions varies from run to run (the separate dQ pass is bitwise deterministic). Off
    # because it is slower: H200, 64K spec, forward + backward 33.29 ms fused, 27.35 ms with the exchange
    # below, 18.99 ms with the two passes (experiments/results/attention_h200/fused_dq_sweep.jsonl): one
    # 32 KiB f32 reduce-add per 64 queries x 64 keys (16 KiB exchanged) costs more than the two matmuls it
    # saves. Its Q/dO ring depth is ``stages_fused``: the dS^T tiles (16 KiB) and the f32 staging (32 KiB
    # per ``dq_slots``) sit beside the ring. Mosaic backward only (``backward="mosaic"``).
    fused_dq: bool = False
    stages_fused: int = 3
    # Fused dQ: True, the two warpgroups exchange dS^T through shared memory and each adds half the head dim
    # of dS K over both warpgroups' keys (half the reduce-add traffic, two meetings per step); False, each
    # adds its own 64 keys' dS K over the whole head dim (no meetings). Needs ``fused_dq``.
    dq_exchange: bool = False
    # Fused dQ: f32 staging tiles per warpgroup that the TMA reduce-adds read from. With one, writing the
    # next step's tile waits until the previous reduce has read it (the next step's other matmuls already
    # overlap that reduce); with more, that many reduces stay in flight. Neither this (with
    # ``stages_fused=2``, since two tiles do not fit beside depth 3 at W = H = 128) nor ``dq_swizzle`` moved
    # the 64K forward + backward (28.11 / 28.20 / 27.99 ms, results R51), while cutting the reduce-add out
    # saved ~6 ms and the whole dQ work ~13 ms. Up to 4: more never fits at W = H = 128.
    dq_slots: int = 1
    # Fused dQ: the staging tiles in (8, 32) tiles with a 128-byte swizzle (as the TMA reads them) rather
    # than plain rows, whose 256-byte stride puts the 8 rows a warp stores at once in the same banks.
    dq_swizzle: bool = False
    # Persistent CTAs of every pass in interpret mode (a GPU uses one per SM). The CPU interpreter's time
    # grows with the CTAs it simulates (several seconds each), not with the items they loop over: tests use 1
    # where the multi-CTA schedule is not the point.
    interpret_ctas: int = 3
    # When a kv head has an odd number of query heads (G = 1: multi-head attention, Llama-2-7B) there is no
    # head pair for two compute warpgroups; with 128-token regions the two warpgroups take the two 64-token
    # chunks of one head instead (same plan row, same K/V blocks), so the forward and the dQ pass keep both
    # warpgroups and their ping-pong. Off: one compute warpgroup per CTA at odd G (the kernel before).
    pair_chunks: bool = True

    @property
    def producer_registers(self) -> int:
        """What the producer warpgroup shrinks to: 40, or less so that two compute warpgroups get theirs."""
        return min(40, 504 - 2 * self.compute_registers)

    def __post_init__(self):
        for name, hi in (("stages", 4), ("stages_dq", 4), ("stages_dkv", 6), ("stages_fused", 6)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= hi:
                raise ValueError(f"MosaicTiling.{name} must be an int in [2, {hi}], got {value!r}")
        if self.backward not in ("mosaic", "triton"):
            raise ValueError(f"MosaicTiling.backward must be 'mosaic' or 'triton', got {self.backward!r}")
        for name in ("pingpong", "overlap", "approx_math", "persistent", "pingpong_dq", "overlap_dq",
                     "delta_in_dq", "pair_chunks", "fused_dq", "dq_exchange", "dq_swizzle"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MosaicTiling.{name} must be a bool, got {getattr(self, name)!r}")
        slots = self.dq_slots
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 4:
            raise ValueError(f"MosaicTiling.dq_slots must be an int in [1, 4], got {slots!r}")
        if (slots != 1 or self.dq_swizzle) and not self.fused_dq:
            raise ValueError(f"MosaicTiling: dq_slots={slots} / dq_swizzle={self.dq_swizzle} shape the fused "
                             "dQ's staging and need fused_dq=True")
        for name in ("overlap_dq", "delta_in_dq"):  # options of the dQ pass: refused where none runs
            if getattr(self, name) and (self.fused_dq or self.backward != "mosaic"):
                raise ValueError(f"MosaicTiling: {name}=True shapes the Mosaic dQ pass, which "
                                 f"backward={self.backward!r} with fused_dq={self.fused_dq} does not run; "
                                 "it needs backward='mosaic' and fused_dq=False")
        if self.overlap_dq and self.pingpong_dq:
            raise ValueError("MosaicTiling: overlap_dq=True and pingpong_dq=True are two schedules of the dQ "
                             "pass; choose one")
        if self.dq_exchange and not self.fused_dq:
            raise ValueError("MosaicTiling: dq_exchange=True needs fused_dq=True (it is a way of fusing dQ)")
        if self.fused_dq and self.backward != "mosaic":
            raise ValueError(f"MosaicTiling: fused_dq=True needs backward='mosaic', got {self.backward!r}")
        # type checks first: True == 1 and 232.0 == 232 would pass the membership tests below
        for name in ("cluster", "cluster_dq"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value not in (1, 2, 4)):
                raise ValueError(f"MosaicTiling.{name} must be None (by length), 1, 2 or 4, got {value!r}")
        if self.cluster_dq not in (None, 1) and (self.fused_dq or self.backward != "mosaic"):
            raise ValueError(f"MosaicTiling: cluster_dq={self.cluster_dq} shapes the Mosaic dQ pass, which "
                             f"backward={self.backward!r} with fused_dq={self.fused_dq} does not run; "
                             "it needs backward='mosaic' and fused_dq=False")
        if isinstance(self.interpret_ctas, bool) or not isinstance(self.interpret_ctas,
                                                                   int) or self.interpret_ctas < 1:
            raise ValueError("MosaicTiling.interpret_ctas must be a positive int, got "
                             f"{self.interpret_ctas!r}")
        if (isinstance(self.compute_registers, bool) or not isinstance(self.compute_registers, int)
                or self.compute_registers not in range(168, 241, 8)):
            # above 240 the producer would keep fewer than 24; below 168 setmaxnreg.inc would shrink
            raise ValueError(f"MosaicTiling.compute_registers must be a multiple of 8 in [168, 240], "
                             f"got {self.compute_registers!r}")


@dataclasses.dataclass(frozen=True)
class Static:
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
        return self.w // BQ

    def __post_init__(self):
        if self.wgs == 2 and self.q_per_kv % 2 == 1 and self.chunks % 2:
            raise ValueError(f"Static: two warpgroups at odd G={self.q_per_kv} need 128-token regions (two "
                             f"64-token chunks), got W={self.w}")

    @property
    def pair_chunks(self) -> bool:
        """The two compute warpgroups split an item's tokens (two 64-token chunks of one head), not its heads:
        odd G with 128-token regions (``MosaicTiling.pair_chunks``)."""
        return self.wgs == 2 and self.q_per_kv % 2 == 1

    @property
    def subs(self) -> int:
        """Items per plan row: 64-token chunks x query heads, ``wgs`` units per item."""
        return self.chunks * self.q_per_kv // self.wgs

    @property
    def items(self) -> int:
        return self.subs * self.groups * self.batch * self.kv_heads

    @property
    def qbufs(self) -> int:
        """Q/O staging buffers per warpgroup: two when persistent (the next item's Q loads during this
        one)."""
        return 2 if self.tiling.persistent else 1


def is_hopper() -> bool:
    """Whether the traced-for device is an sm_90 GPU (``selmerge_jax.kernels.target``)."""
    return target.is_hopper()


def check_supported(q, plan: SelectionPlan, scale) -> None:
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
        raise NotImplementedError(f"pallas_mosaic_gpu: a plan with M={plan.max_selected} "
                                  "slots (supported: M >= 1)")
    if not (plan.causal and plan.include_local):
        raise NotImplementedError(f"pallas_mosaic_gpu: causal={plan.causal}, "
                                  f"include_local={plan.include_local} "
                                  "(supported: causal with the local block)")
    if scale is not None and not scale > 0:
        raise NotImplementedError(f"pallas_mosaic_gpu: scale={scale} (the max trick needs scale > 0)")


def make_static(q, k, plan, scale, tiling: MosaicTiling, interpret: bool) -> Static:
    """The kernels' statics; raises NotImplementedError outside the supported set, ValueError for a ring depth
    that cannot fit in shared memory."""
    kv_heads, g = check_plan_inputs(q, k, k, plan)
    if plan.kv_regions.shape[1] != kv_heads:
        raise NotImplementedError(f"pallas_mosaic_gpu: one selection per kv head (P == K = {kv_heads}), "
                                  f"got P={plan.kv_regions.shape[1]}")
    check_supported(q, plan, scale)
    h = q.shape[3]
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    pair = g % 2 == 1 and plan.block_size == 2 * BQ and tiling.pair_chunks
    st = Static(plan.block_size, h, q.shape[0], plan.num_groups, plan.max_selected, kv_heads, g,
                2 if g % 2 == 0 or pair else 1, scale, jnp.dtype(q.dtype).name, tiling, interpret)
    check_shared_memory(st)
    return with_cluster(st, resolve_cluster(tiling.cluster, st), tiling.persistent)


CLUSTER_FROM_TOKENS = 131072  # measured better at 1M, no worse at 128K, worse at 64K (MosaicTiling.cluster)


def resolve_cluster(value: int | None, st: Static) -> int:
    """``MosaicTiling.cluster`` / ``cluster_dq`` for ``st``'s (padded) sequence length: None picks 2 from
    ``CLUSTER_FROM_TOKENS`` tokens up on a GPU, else 1."""
    if value is not None:
        return value
    return 2 if st.groups * st.w >= CLUSTER_FROM_TOKENS and not st.interpret else 1


def ring_free(st: Static, stages: int):
    """The K/V ring's slot-free barriers: one arrival per compute warpgroup of every cluster member (a cluster
    barrier when the copies are multicast, since a slot is free only once every member has read it)."""
    if st.cluster > 1:
        return plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=st.wgs, num_barriers=stages)
    return plgpu.Barrier(num_arrivals=st.wgs, num_barriers=stages)


def launch_grid(st: Static) -> dict:
    """``plgpu.kernel``'s grid arguments for a K/V-ring pass: ``st.ctas`` CTAs, ``st.cluster`` a cluster."""
    cluster = {"cluster": (st.cluster,), "cluster_names": ("cluster",)} if st.cluster > 1 else {}
    return {"grid": (st.ctas // st.cluster,), "grid_names": ("cta",), **cluster}


def with_cluster(st: Static, cluster: int, persistent: bool) -> Static:
    """``st`` launched in clusters of ``cluster`` CTAs (capped at the largest power of two dividing the items
    per plan row, so a cluster's CTAs always hold items of one row) and its CTA count to match: one per SM
    rounded down to whole clusters (``persistent``), else one per item."""
    cluster = math.gcd(cluster, st.subs)
    ctas = min(st.items, num_sms(st.tiling, st.interpret) // cluster * cluster) if persistent else st.items
    return dataclasses.replace(st, ctas=ctas, cluster=cluster)


SMEM_BYTES = 232448  # H100/H200 shared memory per block (227 KiB)


def check_shared_memory(st: Static) -> None:
    """Rejects ring depths whose buffers alone exceed shared memory, naming the setting (the compiler's own
    error does not). Barriers and alignment add ~3 KiB on top, so a depth that passes here can still just
    miss."""
    t, itemsize = st.tiling, 2
    tile = BQ * st.h * itemsize
    kv_block = st.w * st.h * itemsize
    need = {"stages": st.wgs * (2 if t.persistent else 1) * tile + 2 * t.stages * kv_block}
    if t.backward == "mosaic":
        ring = lambda depth: depth * (2 * tile + 2 * BQ * 4) + 2 * (st.w // BQ) * tile
        if t.fused_dq:  # + the dS^T exchange (bf16) and the f32 dQ staging: 64 x 64 tiles per warpgroup
            need["stages_fused"] = ring(t.stages_fused) + (st.w // BQ) * BQ * BQ * (itemsize + 4 * t.dq_slots)
        else:
            need["stages_dq"] = 2 * st.wgs * tile + 2 * t.stages_dq * kv_block
            need["stages_dkv"] = ring(t.stages_dkv)
    for name, nbytes in need.items():
        if not st.interpret and nbytes > SMEM_BYTES:
            also = f" (with dq_slots={t.dq_slots})" if name == "stages_fused" else ""
            raise ValueError(f"MosaicTiling.{name}={getattr(t, name)}{also} needs {nbytes} "
                             "bytes of shared memory for "
                             f"W={st.w}, H={st.h} (limit {SMEM_BYTES}); use a smaller {name}"
                             + (" or fewer dq_slots" if also else ""))


def num_sms(tiling: MosaicTiling, interpret: bool) -> int:
    """CTAs of a persistent pass: one per SM, or ``tiling.interpret_ctas`` in the interpreter."""
    if interpret:
        return tiling.interpret_ctas
    return target.core_count(default=132)


def rendezvous(sched):
    """Both compute warpgroups meet here (a barrier with one arrival per warpgroup)."""
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)


def as_layout(x, layout, st: Static):
    """Register layout hint (wgmma fragments); the interpreter has no layouts, so it gets the plain array."""
    return x if st.interpret else plgpu.layout_cast(x, layout)


def bcast_rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def pv(acc, p, v_smem, st: Static):
    """``acc + P V``, P the wgmma A operand straight from registers, accumulating in place."""
    if st.interpret:
        return acc + dot(p, v_smem[...])
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem))(plgpu.ACC.init(acc))


def work_item(j, st: Static):
    """This CTA's ``j``-th work item -> ``(b, kh, g, chunk, hgrp)``. Items run sub-tile fastest, so the CTAs
    sharing one plan row (and its K/V blocks) run side by side and hit L2; then groups, then kv heads.
    ``hgrp`` is the item's group of ``wgs`` heads within the kv head, or with ``st.pair_chunks`` (one head per
    item, all of the group's chunks: ``chunk`` is 0) that head itself."""
    item = cta(st) + j * st.ctas
    sub, rest = lax.rem(item, jnp.int32(st.subs)), lax.div(item, jnp.int32(st.subs))
    g, bk = lax.rem(rest, jnp.int32(st.groups)), lax.div(rest, jnp.int32(st.groups))
    b, kh = lax.div(bk, jnp.int32(st.kv_heads)), lax.rem(bk, jnp.int32(st.kv_heads))
    per_head = st.chunks // st.wgs if st.pair_chunks else st.chunks  # items per head and plan row
    return b, kh, g, lax.rem(sub, jnp.int32(per_head)), lax.div(sub, jnp.int32(per_head))


def unit(j, wg, st: Static):
    """Warpgroup ``wg``'s unit of this CTA's ``j``-th item -> ``(b, kh, g, chunk, head)``: 64 tokens
    ``g W + chunk 64 + [0, 64)`` of query head ``head``. The item's warpgroups take consecutive heads of one
    kv head at the same tokens, or (``st.pair_chunks``) consecutive chunks of one head."""
    b, kh, g, chunk, hgrp = work_item(j, st)
    if st.pair_chunks:
        return b, kh, g, chunk * st.wgs + wg, kh * st.q_per_kv + hgrp
    return b, kh, g, chunk, kh * st.q_per_kv + hgrp * st.wgs + wg


def cta(st: Static):
    """Linear CTA index. A cluster's CTAs get consecutive items of one plan row (``ctas`` and the items per
    row are multiples of the cluster size), so they walk the same K/V steps in lockstep and can share each
    copy."""
    if st.cluster == 1:
        return lax.axis_index("cta")
    return lax.axis_index("cta") * st.cluster + lax.axis_index("cluster")


def num_items(st: Static):
    """Items this CTA owns: ``cta, cta + ctas, ...`` (one each without ``persistent``)."""
    first = cta(st)
    return lax.div(jnp.int32(st.items) - first + jnp.int32(st.ctas - 1), jnp.int32(st.ctas))


def kv_producer(refs, st: Static, v_lag: bool = False):
    """The producer warpgroup of the forward and the dQ pass: walks each item's compacted plan row, then the
    group's own region, streaming K/V blocks with TMA into the ``st.tiling.stages``-deep ring. ``v_lag``
    issues each V block one step after its K block (K_0, K_1, V_0, K_2, V_1, ...): the order in which the
    overlapped forward (``MosaicTiling.overlap``) consumes them, so a K load never queues behind a V slot that
    is released a step later."""
    sel_ref, cnt_ref, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, k_free, v_free = refs
    if st.wgs == 2:
        plgpu.set_max_registers(st.tiling.producer_registers, action="decrease")
    stages = st.tiling.stages

    def item(j, base):
        b, kh, g, _, _ = work_item(j, st)
        cnt = cnt_ref[b, kh, g]

        def load(i, src, dst, full, free):
            """Step ``i`` of the item's ``cnt + 1``: steps [0, cnt) read the compacted plan row; step cnt is
            the group's own (local) region."""
            slot, first_use = lax.rem(base + i, jnp.int32(stages)), base + i < stages
            region = jnp.where(i < cnt, sel_ref[b, kh, g, jnp.minimum(i, st.max_selected - 1)], g)
            # With a cluster the slot is free once every member's consumers released it (cluster barrier).
            pl.when(~first_use)(functools.partial(plgpu.barrier_wait, free.at[slot]))
            plgpu.copy_gmem_to_smem(src.at[b, pl.ds(region * st.w, st.w), kh], dst.at[slot], full.at[slot],
                                    collective_axes="cluster" if st.cluster > 1 else None)

        k_stream, v_stream = (k_ref, k_smem, k_bar, k_free), (v_ref, v_smem, v_bar, v_free)

        @pl.loop(0, cnt + 1)
        def _(i):
            load(i, *k_stream)
            if v_lag:
                pl.when(i > 0)(lambda: load(i - 1, *v_stream))
            else:
                load(i, *v_stream)

        if v_lag:
            load(cnt, *v_stream)
        return base + cnt + 1

    total = lax.fori_loop(0, num_items(st), item, jnp.int32(0))

    # Observe the last releases too: every barrier phase then has been waited for when shared memory goes
    # away (the interpreter checks this; on the GPU it costs nothing, the consumers are about to finish).
    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def interpret_params():
    """The Mosaic GPU interpreter's parameters (``interpret=True``: CPU tests)."""
    if InterpretGPUParams is None:  # pragma: no cover
        raise NotImplementedError("pallas_mosaic_gpu: this jax has no Mosaic GPU interpreter "
                                  "(interpret=True)")
    return InterpretGPUParams()


def key_rows(ref, slot, n: int, st: Static):
    """Ring slot ``slot`` of a K or V ring, its first ``n`` keys only when ``n`` is less than the block (the
    half-width local step)."""
    return ref.at[slot] if n == st.w else ref.at[slot, pl.ds(0, n)]


def smem(shape, dtype):
    """A shared-memory tile in the wgmma layout: (8, 64) tiles, 128-byte swizzle."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
