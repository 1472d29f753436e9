"""Selective decode attention in Pallas (Triton lowering): flash-decoding over the selected blocks.

One program per (batch row, kv head, split): it holds the kv head's G query heads as the rows of one tile
(padded to 16, the smallest ``dot`` tile), walks its share of the row's selected blocks straight in the cache
(``blocks`` read with scalar loads; no gathered copy of the slots is ever written), and keeps an online
softmax in float32. The splits spread a row's M blocks over more programs (a decode step has only B * K rows
of work), and their partial (max, sum, accumulator) triples are merged in jnp, which also yields the
log-sum-exp a caller needs to merge more slots into the same softmax.

With ``centroids`` (one merged token per block, the rows of a ``query_select.BlockIndex``) further programs of
the same launch walk the centroid rows, skipping the blocks the row selected (attended token by token), so
the step's whole softmax (selected slots and centroids) is one kernel and one merge. Before, the centroid
segment was a float32 jnp softmax of its own: a dozen small reductions per layer that cost more than the
kernel (R40's trace).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from selmerge_jax.kernels.block_sparse_attention._common import (
    F32,
    NEG_BIG,
    decline_platform,
    dot,
    out_struct,
)
from selmerge_jax.kernels.selective_decode.reference import check_decode_inputs

try:
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover
    _pltriton = None

CHUNK = 128  # slots per loaded tile (a block of more slots is walked in chunks of this many)
ROWS = 16  # the smallest dot tile: a kv head's G query heads are padded to it


@dataclasses.dataclass(frozen=True)
class _Static:
    block: int  # slots per block
    chunk: int  # slots per loaded tile
    per_split: int  # blocks per program
    scale: float
    interpret: bool
    splits: int = 1  # programs over the selected blocks (those after them walk the centroids)
    m: int = 0  # selected blocks per row: the centroid programs skip them
    cchunk: int = 0  # centroid rows per loaded tile (0: no centroids)
    per_csplit: int = 0  # centroid tiles per centroid program

    @property
    def chunks(self) -> int:
        return self.block // self.chunk


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tiles(q_shape: tuple[int, ...], block: int) -> bool:
    """Whether the kernel tiles ``q [B, K, G, H]``: power-of-two blocks and head dim, both >= 16 (Triton's
    smallest ``dot``), at most ``ROWS`` heads per kv head."""
    h, g = q_shape[-1], q_shape[2]
    return _pow2(block) and block >= 16 and _pow2(h) and h >= 16 and g <= ROWS


def centroid_tile(rows: int) -> int:
    """Centroid rows per loaded tile for a centroid store of ``rows`` rows (0 where the kernel cannot tile
    it): 128, or all of them when fewer; a power of two >= 16 that divides ``rows``."""
    c = min(rows, CHUNK)
    return c if _pow2(c) and c >= 16 and rows % c == 0 else 0


def _csplits(tiles_: int) -> int:
    """Programs per (row, kv head) over the centroid tiles: the largest divisor of the tile count <= 8."""
    return next(d for d in range(8, 0, -1) if tiles_ % d == 0)


def _splits(m: int, rows: int) -> int:
    """Programs per (row, kv head): enough for ~128 programs in all, each with a whole number of blocks."""
    s = 1
    while s < 8 and m % (2 * s) == 0 and rows * s < 128:
        s *= 2
    return s


def _div(x, d: int):
    return x if d == 1 else jax.lax.div(x, jnp.asarray(d, x.dtype))


def _rem(x, d: int):
    return jnp.zeros_like(x) if d == 1 else jax.lax.rem(x, jnp.asarray(d, x.dtype))


def _online(q, k, v, kpos, cnt, qpos, carry, scale: float, hidden=None):
    """One tile of slots into the running (max, sum, accumulator): logits with ``log(count)`` added, slots
    not seen (empty, after the query, or ``hidden``) masked."""
    m_i, l_i, acc = carry
    logits = dot(q, k, trans_b=True) * scale + jnp.log(jnp.maximum(cnt, 1e-30))[None, :]
    seen = (kpos >= 0) & (cnt > 0) & (kpos <= qpos)
    if hidden is not None:
        seen = seen & (hidden == 0)
    logits = jnp.where(seen[None, :], logits, -jnp.inf)
    v = jnp.where(seen[:, None], v, jnp.zeros_like(v))  # an empty slot's V may be NaN: 0 * NaN = NaN
    m_new = jnp.maximum(m_i, logits.max(axis=1))  # finite: m_i starts at NEG_BIG
    p = jnp.exp(logits - m_new[:, None])
    alpha = jnp.exp(m_i - m_new)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return m_new, l_i * alpha + p.sum(axis=1), acc


def _kernel(blocks_ref, qpos_ref, q_ref, k_ref, v_ref, pos_ref, cnt_ref, *refs, st: _Static):
    if st.cchunk:
        ck_ref, cv_ref, cpos_ref, ccnt_ref, acc_ref, m_ref, sum_ref = refs
    else:
        acc_ref, m_ref, sum_ref = refs
    b, kh, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]  # [ROWS, H]
    qpos = qpos_ref[b]

    def block_step(it, carry):
        j = s * st.per_split + _div(it, st.chunks)
        start = blocks_ref[b, kh, j] * st.block + _rem(it, st.chunks) * st.chunk
        ds = pl.ds(start, st.chunk)
        return _online(q, k_ref[ds, :], v_ref[ds, :], pos_ref[ds], cnt_ref[ds], qpos, carry, st.scale)

    def centroid_step(it, carry):
        start = ((s - st.splits) * st.per_csplit + it) * st.cchunk
        region = start + jax.lax.broadcasted_iota(jnp.int32, (st.cchunk,), 0)
        # a selected block is attended token by token: its centroid is hidden (M scalar loads, no scatter)
        chosen = jax.lax.fori_loop(
            0, st.m, lambda j, c: jnp.maximum(c, (region == blocks_ref[b, kh, j]).astype(jnp.int32)),
            jnp.zeros((st.cchunk,), jnp.int32))
        ds = pl.ds(start, st.cchunk)
        return _online(q, ck_ref[ds, :], cv_ref[ds, :], cpos_ref[ds], ccnt_ref[ds], qpos, carry, st.scale,
                       hidden=chosen)

    rows, h = q.shape
    init = (jnp.full((rows,), NEG_BIG, F32), jnp.zeros((rows,), F32), jnp.zeros((rows, h), F32))

    def run(trips: int, step):
        m_i, l_i, acc = jax.lax.fori_loop(0, trips, step, init)
        acc_ref[...] = acc
        m_ref[...] = m_i
        sum_ref[...] = l_i

    if not st.cchunk:
        run(st.per_split * st.chunks, block_step)
        return
    pl.when(s < st.splits)(lambda: run(st.per_split * st.chunks, block_step))
    pl.when(s >= st.splits)(lambda: run(st.per_csplit, centroid_step))


def _merge(acc, m, total_of_split):
    """Partials ``acc [B, K, S, R, H]``, ``m``/``l [B, K, S, R]`` -> ``(out [B, K, R, H], lse [B, K, R])``."""
    top = m.max(axis=2)
    w = jnp.exp(m - top[:, :, None])
    total = (w * total_of_split).sum(axis=2)
    out = (w[..., None] * acc).sum(axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out, lse


def selective_decode_triton(q, k, v, pos, count, blocks, q_pos, *, block: int, scale: float | None = None,
                            centroids=None, interpret: bool = False):
    """``(out float32 [B, K, G, H], lse float32 [B, K, G])``: see ``reference.py`` for the contract.

    Raises ``NotImplementedError`` off a GPU (unless ``interpret``) or for shapes the kernel does not tile
    (``tiles``, ``centroid_tile``); bad shapes raise ``ValueError`` naming the argument."""
    decline_platform("selective_decode_triton", "gpu", interpret)
    check_decode_inputs(q, k, v, pos, count, blocks, q_pos, block, centroids)
    if not tiles(q.shape, block):
        raise NotImplementedError(f"selective_decode_triton tiles power-of-two blocks and head dims >= 16, "
                                  f"<= {ROWS} heads per kv head; got block={block}, q {q.shape}")
    b, kh, g, h = q.shape
    c, m = k.shape[2], blocks.shape[2]
    splits = _splits(m, b * kh)
    cchunk = csplits = 0
    if centroids is not None:
        rows = centroids[0].shape[2]
        cchunk = centroid_tile(rows)
        if not cchunk:
            raise NotImplementedError(f"selective_decode_triton tiles centroid stores of a power-of-two "
                                      f">= 16 rows or a multiple of {CHUNK}; got {rows}")
        csplits = _csplits(rows // cchunk)
    per_csplit = cchunk and centroids[0].shape[2] // cchunk // csplits
    st = _Static(block=block, chunk=min(block, CHUNK), per_split=m // splits,
                 scale=h ** -0.5 if scale is None else float(scale), interpret=bool(interpret),
                 splits=splits, m=m, cchunk=cchunk, per_csplit=per_csplit)
    qp = jnp.pad(q.astype(k.dtype), ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    per_head = lambda *shape: pl.BlockSpec((None, None, *shape),
                                           lambda bi, ki, si: (bi, ki) + (0,) * len(shape))
    per_split = lambda *shape: pl.BlockSpec((None, None, None, *shape),
                                            lambda bi, ki, si: (bi, ki, si) + (0,) * len(shape))
    params = None if _pltriton is None else _pltriton.CompilerParams(num_warps=4, num_stages=2)
    blocks = blocks.astype(jnp.int32)
    q_pos = jnp.asarray(q_pos, jnp.int32)
    # K and V in the cache's dtype (one dot dtype for both stores), positions int32, counts float32
    store = lambda kk, vv, pp, cc: (kk.astype(k.dtype), vv.astype(k.dtype), pp.astype(jnp.int32),
                                    cc.astype(F32))
    stores = [*store(k, v, pos, count)]
    in_specs = [whole(blocks), whole(q_pos), per_head(ROWS, h), per_head(c, h), per_head(c, h), per_head(c),
                per_head(c)]
    if centroids is not None:
        rows = centroids[0].shape[2]
        stores += store(*centroids)
        in_specs += [per_head(rows, h), per_head(rows, h), per_head(rows), per_head(rows)]
    total = splits + csplits
    acc, mx, sm = pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(b, kh, total),
        in_specs=in_specs,
        out_specs=[per_split(ROWS, h), per_split(ROWS), per_split(ROWS)],
        out_shape=[out_struct((b, kh, total, ROWS, h), F32, q), out_struct((b, kh, total, ROWS), F32, q),
                   out_struct((b, kh, total, ROWS), F32, q)],
        compiler_params=params,
        interpret=st.interpret,
        name="selective_decode",
    )(blocks, q_pos, qp, *stores)
    out, lse = _merge(acc, mx, sm)
    return out[:, :, :g], lse[:, :, :g]
