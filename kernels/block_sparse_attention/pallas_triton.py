"""Block-sparse flash attention in Pallas (Triton lowering): forward, dQ and dK/dV kernels with a custom VJP.

Layout. q/k/v stay in their ``[B, T, heads, H]`` layout (no transposes in HBM). One program owns a query tile
of ``block_q`` tokens times ``hp = N // P`` query heads: when selection is per kv head (``P == K``) the ``G``
heads of a kv group share the plan row, so they are packed into the rows of one matmul tile
(``rows = block_q * G``, token-major) and every K/V block is loaded once for all of them. With per-query-head
selection (``P == N``) each program holds one head.

Passes.
* forward and dQ walk the *compacted* plan row of the tile's query group (valid regions only, dynamic trip
  count) and then the group's own local block (causal mask only there);
* dK/dV walks the *transposed* plan (``transpose.py``): for one KV chunk, every query group that selected its
  region, then the local queries of its own group. No atomics anywhere: each output tile has one writer, so
  results are bitwise deterministic.
Packed documents: with ``segment_ids`` ``int [B, T]`` every pass also loads the tile's and the key chunk's
ids and masks pairs of different documents (the forward's scores, the dQ pass's dS, the dK/dV pass's P^T), in
selected regions and the local block alike; without them the kernels are specialised without that load.
Softmax statistics are float32; exponentials are base 2 with ``log2(e)`` folded into the scale. The forward
saves the natural-log LSE, which is also what ``return_lse`` returns (``-inf`` for a query with nothing to
attend, whose output is 0).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from selmerge_jax.kernels.block_sparse_attention._common import (
    F32,
    LOG2E,
    NEG_BIG,
    backward_row_terms,
    decline_dtype,
    decline_platform,
    dot,
    named_residuals,
    out_struct,
)
from selmerge_jax.kernels.block_sparse_attention.plan import (
    SelectionPlan,
    check_plan_inputs,
    check_segment_ids,
)
from selmerge_jax.kernels.block_sparse_attention.transpose import compact_plan, transpose_plan

# optional dependency: the Triton compiler params moved between jax releases; only the GPU build needs them
try:
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover
    _pltriton = None

# The segment mask is checked against the reference in interpret mode (tests/test_kernels_triton_segments.py)
# and natively by the gpu-marked test there (passed on an H200, jax 0.11.2, 2026-12-04). Switching this off
# makes native calls with segment_ids decline again (the dispatcher then falls back to "xla").
NATIVE_SEGMENTS = True

# ``make_static`` and ``attend_bwd`` are the Triton backward's entry points for ``pallas_mosaic_gpu``
# (``MosaicTiling(backward="triton")`` runs these kernels on the Mosaic forward's residuals).
__all__ = ["TritonTiling", "attend_bwd", "block_sparse_attention_triton", "make_static"]


@dataclasses.dataclass(frozen=True)
class TritonTiling:
    """Tile sizes and launch parameters. ``rows`` are query rows per matmul tile (tokens x packed heads)."""

    rows_fwd: int = 128
    block_k_fwd: int = 128
    warps_fwd: int = 8
    stages_fwd: int = 3
    # Backward: dQ owns many query rows and streams key chunks; dK/dV owns many keys and streams query chunks
    # (its two f32 accumulators are [keys, H]). Defaults are the fastest of the H100 sweeps in
    # experiments/results/attention_h100/run5a.jsonl and archive/attention_h100_run5b.jsonl
    # (block_k_dq=128 exceeds shared memory).
    rows_dq: int = 128
    block_k_dq: int = 64
    rows_dkv: int = 64
    block_k_dkv: int = 128
    warps_dq: int = 8
    stages_dq: int = 3
    warps_dkv: int = 8
    stages_dkv: int = 3
    # Exponentials as one ``ex2.approx.ftz`` (a single MUFU op) instead of libdevice ``exp2f``, whose denormal
    # handling adds a compare and two multiplies per score. Measured on the H100 at 64K: forward unchanged,
    # fwd+bwd 1.2% faster (within noise); kept on because the default is the configuration that was timed.
    fast_softmax: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is bool or f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"TritonTiling.{f.name} must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TritonTiling.{f.name} must be a positive int, got {value!r}")
        for name in ("rows_fwd", "block_k_fwd", "rows_dq", "block_k_dq", "rows_dkv", "block_k_dkv"):
            value = getattr(self, name)
            if value & (value - 1) or value < 16:
                raise ValueError(f"TritonTiling.{name}={value} must be a power of two "
                                 ">= 16 (tensor-core tiles)")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: it is a nondiff argument of the custom VJP)."""

    w: int
    merge: int
    groups: int
    kv_heads: int
    sel_heads: int
    heads_per_tile: int
    q_per_kv: int
    causal: bool
    include_local: bool
    scale: float
    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    tiling: TritonTiling
    interpret: bool
    segments: bool = False  # packed documents: a segment_ids input masks pairs of different documents

    @property
    def group_tokens(self):
        return self.w * self.merge


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def make_static(q, k, plan, scale, tiling: TritonTiling, interpret: bool, segments: bool = False) -> _Static:
    """The kernels' statics (hashable); raises NotImplementedError for shapes the kernels do not tile."""
    kv_heads, g = check_plan_inputs(q, k, k, plan)
    n, h = q.shape[2], q.shape[3]
    p = plan.kv_regions.shape[1]
    hp = n // p
    if h & (h - 1) or h < 16:
        raise NotImplementedError(f"pallas_triton needs a power-of-two head dim >= 16, got H={h}")
    if hp & (hp - 1):
        raise NotImplementedError(f"pallas_triton packs a power-of-two number of heads, got N/P={hp}")
    w, lt = plan.block_size, plan.group_tokens
    blocks = []
    for rows, block_k in ((tiling.rows_fwd, tiling.block_k_fwd), (tiling.rows_dq, tiling.block_k_dq),
                          (tiling.rows_dkv, tiling.block_k_dkv)):
        bq, bk = _pow2_divisor(lt, max(rows // hp, 1)), _pow2_divisor(w, block_k)
        if bk < 16 or bq * hp < 16:
            raise NotImplementedError(f"pallas_triton needs block_size (W={w}) and tiles divisible by 16")
        blocks += [bq, bk]
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    return _Static(w, plan.merge, plan.num_groups, kv_heads, p, hp, g, plan.causal, plan.include_local, scale,
                   *blocks, tiling, interpret, segments)


def _params(warps, stages):
    if _pltriton is None:
        return None
    return _pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def _div(x, d: int):
    """``x // d`` for non-negative traced ints: plain ``lax.div`` (jnp's floor-division lowers badly in
    Triton)."""
    if isinstance(d, int) and d == 1:
        return x
    return jax.lax.div(x, jnp.asarray(d, x.dtype))


def _exp2(x, st: "_Static"):
    """``2 ** x`` in float32; natively one ``ex2.approx.ftz`` (results below 2**-126 flush to 0, -inf ->
    0)."""
    if st.interpret or not st.tiling.fast_softmax or _pltriton is None:
        return jnp.exp2(x)
    [y] = _pltriton.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return y


def _scores_minus(s, scale2, sub, axis: int):
    """``s * scale2 - sub`` broadcast along ``axis`` (written so the multiply and subtract fuse into one
    FMA)."""
    sub = sub[:, None] if axis == 0 else sub[None, :]
    return s * scale2 - sub


def _rem(x, d: int):
    if isinstance(d, int) and d == 1:
        return jnp.zeros_like(x)
    return jax.lax.rem(x, jnp.asarray(d, x.dtype))


def _flat(x):
    """``[tokens, heads, H]`` -> ``[tokens * heads, H]`` (token-major rows; free: same memory order)."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def _row_positions(first_token, tokens, hp):
    return first_token + _div(jax.lax.broadcasted_iota(jnp.int32, (tokens * hp,), 0), hp)


def _row_segments(seg_ref, first_token, tokens, hp):
    """Segment id of each token-major row ``[tokens * hp]`` of a tile (None without packed documents)."""
    if seg_ref is None:
        return None
    ids = seg_ref[pl.ds(first_token, tokens)]
    return jnp.broadcast_to(ids[:, None], (tokens, hp)).reshape(tokens * hp)


def _same_segment(seg_ref, qseg, start, count, keys_first: bool = False):
    """``[rows, count]`` (``[count, rows]`` when ``keys_first``) True where query row and key share a
    document; None without packed documents."""
    if seg_ref is None:
        return None
    kseg = seg_ref[pl.ds(start, count)]
    return kseg[:, None] == qseg[None, :] if keys_first else qseg[:, None] == kseg[None, :]


def _and(a, b):
    return b if a is None else a if b is None else a & b


# ----------------------------------------------------------------------------------------------- forward


def _fwd_chunk(carry, q, k_ref, v_ref, start, qpos, st: _Static, masked: bool, seg=(None, None)):
    """One online-softmax update of the tile with keys ``[start, start + block_k)``; ``seg``: (segment ids
    ref, the tile rows' ids) with packed documents."""
    m_i, l_i, acc = carry
    k = k_ref[pl.ds(start, st.block_k), :]
    v = v_ref[pl.ds(start, st.block_k), :]
    scale2 = st.scale * LOG2E
    s = dot(q, k, trans_b=True)  # raw scores: the scale is applied inside the exponent's FMA
    keep = _same_segment(seg[0], seg[1], start, st.block_k)
    if masked:
        kpos = start + jax.lax.broadcasted_iota(jnp.int32, (st.block_k,), 0)
        keep = _and(keep, qpos[:, None] >= kpos[None, :])
    if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=1) * scale2)  # max commutes with a positive scale
    p = _exp2(_scores_minus(s, scale2, m_new, 0), st)
    alpha = _exp2(m_i - m_new, st)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return m_new, l_i * alpha + p.sum(axis=1), acc


def _local_bounds(first_token, tokens, group, st: _Static, block):
    """Chunks ``[lo, hi)`` (in units of ``block``) of the group's own block a query tile can see."""
    lo = _div(group * st.group_tokens, block)
    end = first_token + tokens if st.causal else (group + 1) * st.group_tokens
    return lo, _div(end + block - 1, block)


def _fwd_kernel(sel_ref, cnt_ref, *refs, st: _Static):
    seg_ref, (q_ref, k_ref, v_ref, o_ref, lse_ref) = _split_segments(refs, st)
    i, b, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = i * st.block_q
    group = _div(t0, st.group_tokens)
    q = _flat(q_ref[...])
    rows = q.shape[0]
    qpos = _row_positions(t0, st.block_q, st.heads_per_tile)
    seg = (seg_ref, _row_segments(seg_ref, t0, st.block_q, st.heads_per_tile))
    carry = (jnp.full((rows,), NEG_BIG, F32), jnp.zeros((rows,), F32), jnp.zeros(q.shape, F32))
    chunks = st.w // st.block_k

    def selected(it, c):
        region = sel_ref[b, p, group, _div(it, chunks)]
        return _fwd_chunk(c, q, k_ref, v_ref, region * st.w + _rem(it, chunks) * st.block_k, qpos, st, False,
                          seg)

    carry = jax.lax.fori_loop(0, cnt_ref[b, p, group] * chunks, selected, carry)
    if st.include_local:
        lo, hi = _local_bounds(t0, st.block_q, group, st, st.block_k)
        carry = jax.lax.fori_loop(
            lo, hi, lambda j, c: _fwd_chunk(c, q, k_ref, v_ref, j * st.block_k, qpos, st, st.causal, seg),
            carry)
    m_i, l_i, acc = carry
    nonempty = l_i > 0
    out = acc / jnp.where(nonempty, l_i, 1.0)[:, None]
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
    lse = jnp.where(nonempty, (m_i + jnp.log2(jnp.where(nonempty, l_i, 1.0))) / LOG2E, -jnp.inf)
    lse_ref[...] = lse.reshape(lse_ref.shape)


def _split_segments(refs, st: _Static):
    """(segment ids ref or None, the remaining refs): the ids come first when the kernel has them."""
    return (refs[0], refs[1:]) if st.segments else (None, refs)


def _segment_inputs(seg, t: int):
    """The ``[B, T]`` ids as a kernel input (each program reads its batch row whole), or nothing."""
    if seg is None:
        return [], []
    return [seg], [pl.BlockSpec((None, t), lambda *idx: (idx[1], 0))]


def _forward(q, k, v, sel, cnt, st: _Static, seg=None):
    b, t, n, h = q.shape
    hp, per_kv = st.heads_per_tile, st.sel_heads // st.kv_heads
    grid = (t // st.block_q, b, st.sel_heads)
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, bi, p: (bi, 0, _div(p, per_kv), 0))
    tile = pl.BlockSpec((None, st.block_q, hp, h), lambda i, bi, p: (bi, i, p, 0))
    seg_args, seg_specs = _segment_inputs(seg, t)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=grid,
        in_specs=[_whole(sel), _whole(cnt), *seg_specs, tile, kv_spec, kv_spec],
        out_specs=[tile, pl.BlockSpec((None, st.block_q, hp), lambda i, bi, p: (bi, i, p))],
        out_shape=[out_struct(q.shape, q.dtype, q), out_struct((b, t, n), F32, q)],
        compiler_params=_params(st.tiling.warps_fwd, st.tiling.stages_fwd),
        interpret=st.interpret,
        name="block_sparse_fwd",
    )(sel, cnt, *seg_args, q, k, v)


def _whole(x):
    """Block spec handing the kernel the full array (plan tables, read with scalar loads)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


# ---------------------------------------------------------------------------------------------- backward


def _dq_chunk(dq, q, do, lse2, delta, k_ref, v_ref, start, qpos, st: _Static, masked: bool,
              seg=(None, None)):
    k = k_ref[pl.ds(start, st.block_k_dq), :]
    v = v_ref[pl.ds(start, st.block_k_dq), :]
    p = _exp2(_scores_minus(dot(q, k, trans_b=True), st.scale * LOG2E, lse2, 0), st)
    ds = p * (dot(do, v, trans_b=True) - delta[:, None])
    keep = _same_segment(seg[0], seg[1], start, st.block_k_dq)
    if masked:
        kpos = start + jax.lax.broadcasted_iota(jnp.int32, (st.block_k_dq,), 0)
        keep = _and(keep, qpos[:, None] >= kpos[None, :])
    if keep is not None:
        ds = jnp.where(keep, ds, 0.0)
    return dq + dot(ds.astype(k.dtype), k)


def _dq_kernel(sel_ref, cnt_ref, *refs, st: _Static):
    seg_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = _split_segments(refs, st)
    i, b, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = i * st.block_q_dq
    group = _div(t0, st.group_tokens)
    q, do = _flat(q_ref[...]), _flat(do_ref[...])
    lse2, delta = lse_ref[...].reshape(q.shape[0]), delta_ref[...].reshape(q.shape[0])
    qpos = _row_positions(t0, st.block_q_dq, st.heads_per_tile)
    seg = (seg_ref, _row_segments(seg_ref, t0, st.block_q_dq, st.heads_per_tile))
    chunks = st.w // st.block_k_dq

    def selected(it, dq):
        start = sel_ref[b, p, group, _div(it, chunks)] * st.w + _rem(it, chunks) * st.block_k_dq
        return _dq_chunk(dq, q, do, lse2, delta, k_ref, v_ref, start, qpos, st, False, seg)

    dq = jax.lax.fori_loop(0, cnt_ref[b, p, group] * chunks, selected, jnp.zeros(q.shape, F32))
    if st.include_local:
        lo, hi = _local_bounds(t0, st.block_q_dq, group, st, st.block_k_dq)
        dq = jax.lax.fori_loop(lo, hi, lambda j, a: _dq_chunk(
            a, q, do, lse2, delta, k_ref, v_ref, j * st.block_k_dq, qpos, st, st.causal, seg), dq)
    dq_ref[...] = (dq * st.scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_chunk(carry, k, v, kpos, refs, row0, head0, st: _Static, masked: bool):
    """Adds the contribution of query rows ``[row0, row0 + block_q_dkv)`` x heads ``[head0, head0 + hp)``."""
    dk, dv = carry
    q_ref, do_ref, lse_ref, delta_ref, seg_ref, kseg = refs
    rows, heads = pl.ds(row0, st.block_q_dkv), pl.ds(head0, st.heads_per_tile)
    q, do = _flat(q_ref[rows, heads, :]), _flat(do_ref[rows, heads, :])
    lse2 = lse_ref[rows, heads].reshape(q.shape[0])
    delta = delta_ref[rows, heads].reshape(q.shape[0])
    # Transposed scores [block_k, rows]: every matmul has the keys as its M dimension (wgmma-sized) and
    # dV += P^T dO, dK += dS^T Q need no register transpose (19% faster fwd+bwd at 64K than [rows, block_k]).
    pt = _exp2(_scores_minus(dot(k, q, trans_b=True), st.scale * LOG2E, lse2, 1), st)
    keep = None
    if seg_ref is not None:
        keep = kseg[:, None] == _row_segments(seg_ref, row0, st.block_q_dkv, st.heads_per_tile)[None, :]
    if masked:
        qpos = _row_positions(row0, st.block_q_dkv, st.heads_per_tile)
        keep = _and(keep, kpos[:, None] <= qpos[None, :])
    if keep is not None:
        pt = jnp.where(keep, pt, 0.0)
    dv = dv + dot(pt.astype(do.dtype), do)
    # Masked entries already have pt = 0, so dS^T = pt * (dP^T - delta) is 0 there (dP^T is finite).
    dst = pt * (dot(v, do, trans_b=True) - delta[None, :])
    return dk + dot(dst.astype(q.dtype), q), dv


def _dkv_kernel(off_ref, ent_ref, *refs, st: _Static):
    seg_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = _split_segments(refs, st)
    j, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kstart = j * st.block_k_dkv
    region = _div(kstart, st.w)
    k, v = k_ref[...], v_ref[...]
    kpos = kstart + jax.lax.broadcasted_iota(jnp.int32, (st.block_k_dkv,), 0)
    kseg = None if seg_ref is None else seg_ref[pl.ds(kstart, st.block_k_dkv)]
    refs = (q_ref, do_ref, lse_ref, delta_ref, seg_ref, kseg)
    hp, per_kv, lt = st.heads_per_tile, st.sel_heads // st.kv_heads, st.group_tokens
    qchunks = lt // st.block_q_dkv
    first = off_ref[b, kh, region]

    def selected(it, c):
        code = ent_ref[b, kh, first + _div(it, qchunks)]
        row0 = _rem(code, st.groups) * lt + _rem(it, qchunks) * st.block_q_dkv
        head0 = (kh * per_kv + _div(code, st.groups)) * hp
        return _dkv_chunk(c, k, v, kpos, refs, row0, head0, st, False)

    zeros = jnp.zeros(k.shape, F32)
    count = (off_ref[b, kh, region + 1] - first) * qchunks
    carry = jax.lax.fori_loop(0, count, selected, (zeros, zeros))
    if st.include_local:
        gstart = _div(region, st.merge) * lt
        # Causal: query chunks before the one holding this key chunk cannot see it.
        q0 = _div(kstart - gstart, st.block_q_dkv) if st.causal else 0
        nq, head_blocks = qchunks - q0, st.q_per_kv // hp

        def local(it, c):
            row0 = gstart + (q0 + _rem(it, nq)) * st.block_q_dkv
            return _dkv_chunk(c, k, v, kpos, refs, row0, kh * st.q_per_kv + _div(it, nq) * hp, st, st.causal)

        carry = jax.lax.fori_loop(0, nq * head_blocks, local, carry)
    dk, dv = carry
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_call(q, k, v, do, lse2, delta, sel, cnt, st: _Static, reuse=None, seg=None):
    """dQ ``[B, T, N, H]``. ``reuse``: a dead buffer of q's shape and dtype (the forward output, once delta is
    formed) that dQ is written into, so the backward pass allocates no new T x N x H array; at T = 1M that is
    the 8 GiB that kept the layer's peak above 40 GB. XLA copies it first if it is still live elsewhere."""
    b, t, _, h = q.shape
    hp, per_kv = st.heads_per_tile, st.sel_heads // st.kv_heads
    kv_spec = pl.BlockSpec((None, t, None, h), lambda i, bi, p: (bi, 0, _div(p, per_kv), 0))
    tile = pl.BlockSpec((None, st.block_q_dq, hp, h), lambda i, bi, p: (bi, i, p, 0))
    stat = pl.BlockSpec((None, st.block_q_dq, hp), lambda i, bi, p: (bi, i, p))
    seg_args, seg_specs = _segment_inputs(seg, t)
    args = [sel, cnt, *seg_args, q, k, v, do, lse2, delta]
    in_specs = [_whole(sel), _whole(cnt), *seg_specs, tile, kv_spec, kv_spec, tile, stat, stat]
    kernel = _dq_kernel
    aliases = {}
    if reuse is not None and reuse.shape == q.shape and reuse.dtype == q.dtype:
        args, in_specs, aliases = [*args, reuse], [*in_specs, tile], {len(args): 0}
        kernel = lambda *refs, st: _dq_kernel(*refs[:-2], refs[-1], st=st)  # the aliased input is never read
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        grid=(t // st.block_q_dq, b, st.sel_heads),
        in_specs=in_specs,
        out_specs=tile,
        out_shape=out_struct(q.shape, q.dtype, q),
        input_output_aliases=aliases,
        compiler_params=_params(st.tiling.warps_dq, st.tiling.stages_dq),
        interpret=st.interpret,
        name="block_sparse_dq",
    )(*args)


def _dkv_call(q, k, v, do, lse2, delta, offsets, entries, st: _Static, seg=None):
    b, t, n, h = q.shape
    seg_args, seg_specs = _segment_inputs(seg, t)
    full = pl.BlockSpec((None, t, n, h), lambda j, bi, kh: (bi, 0, 0, 0))
    full_stat = pl.BlockSpec((None, t, n), lambda j, bi, kh: (bi, 0, 0))
    kv_tile = pl.BlockSpec((None, st.block_k_dkv, None, h), lambda j, bi, kh: (bi, j, kh, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid=(t // st.block_k_dkv, b, st.kv_heads),
        in_specs=[_whole(offsets), _whole(entries), *seg_specs, full, kv_tile, kv_tile, full, full_stat,
                  full_stat],
        out_specs=[kv_tile, kv_tile],
        out_shape=[out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)],
        compiler_params=_params(st.tiling.warps_dkv, st.tiling.stages_dkv),
        interpret=st.interpret,
        name="block_sparse_dkv",
    )(offsets, entries, *seg_args, q, k, v, do, lse2, delta)


# ------------------------------------------------------------------------------------------ custom VJP


def _plan(regions, st: _Static) -> SelectionPlan:
    return SelectionPlan(regions, block_size=st.w, merge=st.merge, causal=st.causal,
                         include_local=st.include_local)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, regions, seg, st: _Static):
    sel, cnt = compact_plan(_plan(regions, st))
    return _forward(q, k, v, sel, cnt, st, seg)


def _attend_fwd(q, k, v, regions, seg, st):
    out, lse = _attend(q, k, v, regions, seg, st)
    out, lse = named_residuals(out, lse)  # what the model's remat="save" keeps
    return (out, lse), (q, k, v, regions, out, lse, seg)


def attend_bwd(st: _Static, res, cotangents):
    """The custom VJP's backward: ``(dq, dk, dv, None)`` from residuals ``(q, k, v, regions, out, lse)``
    (natural-log LSE ``[B, T, N]``; a seventh, the ``[B, T]`` segment ids, with packed documents) and
    cotangents ``(dout, dlse)``; ``st`` from ``make_static``."""
    q, k, v, regions, out, lse, *rest = res
    seg = rest[0] if rest else None
    do, dlse = cotangents
    plan = _plan(regions, st)
    delta, lse2 = backward_row_terms(do, out, lse, dlse, base2=True)
    sel, cnt = compact_plan(plan)
    dq = _dq_call(q, k, v, do, lse2, delta, sel, cnt, st, reuse=out, seg=seg)
    offsets, entries = transpose_plan(plan, st.kv_heads)
    dk, dv = _dkv_call(q, k, v, do, lse2, delta, offsets, entries, st, seg=seg)
    return dq, dk, dv, None


def _attend_bwd(st: _Static, res, cotangents):
    return (*attend_bwd(st, res, cotangents), None)  # no cotangent for the segment ids


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_sparse_attention_triton(q, k, v, plan: SelectionPlan, *, scale: float | None = None,
                                  return_lse: bool = False, tiling: TritonTiling | None = None,
                                  interpret: bool = False, segment_ids=None):
    """Block-sparse attention with the Pallas Triton kernels (same contract as the reference).

    Args:
      q, k, v, plan, scale, return_lse, segment_ids: as ``block_sparse_attention_reference``.
      tiling: tile sizes and launch parameters (``TritonTiling()`` by default).
      interpret: run the kernels in the Pallas interpreter (any backend; slow, for tests).

    Raises:
      NotImplementedError: not on a GPU (and not interpreting), shapes the kernels do not tile, or
        ``segment_ids`` natively when ``NATIVE_SEGMENTS`` is off; the dispatcher then falls through to the
        next implementation.
    """
    decline_platform("pallas_triton", "gpu", interpret)
    decline_dtype("pallas_triton", q.dtype, (jnp.bfloat16, jnp.float16, jnp.float32))
    check_plan_inputs(q, k, v, plan)
    check_segment_ids(segment_ids, q)
    if segment_ids is not None and not interpret and not NATIVE_SEGMENTS:
        raise NotImplementedError("pallas_triton: native segment_ids are switched off "
                                  "(pallas_triton.NATIVE_SEGMENTS = False)")
    st = make_static(q, k, plan, scale, tiling or TritonTiling(), bool(interpret), segment_ids is not None)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    out, lse = _attend(q, k, v, plan.kv_regions.astype(jnp.int32), seg, st)
    return (out, lse) if return_lse else out


IMPLEMENTATION = block_sparse_attention_triton  # what ``api`` registers as "pallas_triton"
