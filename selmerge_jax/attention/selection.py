"""Selection: region summaries, correlation scores and the per-group top-k that builds a SelectionPlan.

Scores are computed a chunk of query groups at a time (one call, or ``lax.map`` over chunks), so no R x R
matrix is ever built: 1M tokens fit. With the ``"previous"`` rule (causal or not) every member of a group
ranks with the same summary (region gs - 1), so the group's row is one top-k of one score row:
``_previous_rows`` scores a whole chunk of groups with one matmul and one top-k, the chunk as large as keeps
its scores under ``SCORE_BYTES`` unless ``selection_batch`` fixes it (a few steps even at 1M; selection was
once a loop of small steps costing 40-50% of the op); causal, over every group, bands of chunks score only the
regions before their end (``_causal_bands``). ``"group"`` keeps the general rule below
(``_group_plan``), ``selection_batch`` (default 16) groups per step.

Rule (docs/ARCHITECTURE.md): for a group starting at region ``gs``, candidates are the regions strictly before
``gs`` (causal) or outside the group (non-causal). Each member region ranks the candidates by the raw dot
product of summaries (ties go to the lower index, as ``lax.top_k`` guarantees) and keeps its top ``M =
top_k - merge``; the group keeps the ``M`` regions of smallest priority ``min_i(rank_i * merge + i)``. With at
most ``M`` candidates every candidate is kept (dense). Sinks get the best priority. No gradient flows here.

Packed documents (``segment_ids``): a region is a candidate of a group only if their segment-id ranges
``[min, max]`` overlap, and sinks count from the first region of the group's first document. With documents
packed one after another (non-decreasing ids) that is exactly "regions holding a token of the group's
documents", so a document whose start is a multiple of ``block_size * merge`` gets the plan it gets alone;
with other orders the test is a superset (a region may be selected whose tokens the op then masks). A region
shared by two documents is summarised over its last document's tokens only (``region_summaries``), so with
``selection_source="previous"`` no document's plan depends on another document's tokens.
"""

import math

import jax
import jax.numpy as jnp

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.kernels.block_sparse_attention import SelectionPlan
from selmerge_jax.validation import fail

__all__ = ["SCORE_BYTES", "decode_plan_rows", "key_summaries", "plan_rows", "query_summaries",
           "region_summaries", "segment_ranges", "select_regions", "selection_summaries"]

_NO_PRIORITY = jnp.iinfo(jnp.int32).max
# float32 scores one step of the "previous" selection holds by default (B * P * groups * R * 4 bytes; an
# explicit selection_batch overrides it): 256 MiB is 1/8 of one 1M-token layer's score matrix (R = 8192,
# P = 8) and nothing beside that layer's q/k/v.
SCORE_BYTES = 256 << 20
_GROUP_BATCH = 16  # groups per step of the general ("group") rule when selection_batch is None
_ROUNDS_TOP_K = 24  # top-k by rounds of argmax up to this k (measured at 16); lax.top_k above
_ROUNDS_MIN_COLUMNS = 1024  # shorter rows: lax.top_k (rounds were 2.5x faster at 1024, 2x slower at 128)
_BANDS = 4  # most score widths a causal selection compiles (_causal_bands)
_BAND_ALIGN = 128  # a band's width in regions is a multiple of this (the top-k's tiles divide it)
_MIN_TILE, _MAX_TILE = 8, 128  # columns per tile of the top-k's tile filter (``_tile_width``)


def region_summaries(x, block_size: int, num_valid_tokens: int | None = None, segment_ids=None):
    """Mean of each region's vectors: x ``[B, T, heads, H]`` -> ``float32 [B, R, heads, H]``.

    Tokens at positions >= ``num_valid_tokens`` (internal padding) are left out of the mean. With
    ``segment_ids`` ``int [B, T]`` only the tokens of the region's last (largest-id) segment count: a region
    where one packed document ends and the next begins is a candidate (causally) only for groups of the later
    document, so its summary holds only that document's tokens.
    """
    b, t, nh, h = x.shape
    r = t // block_size
    xr = x.reshape(b, r, block_size, nh, h).astype(jnp.float32)
    if (num_valid_tokens is None or num_valid_tokens >= t) and segment_ids is None:
        return xr.mean(2)
    pos = jnp.arange(t).reshape(1, r, block_size)
    keep = pos < (t if num_valid_tokens is None else num_valid_tokens)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids).reshape(b, r, block_size)
        keep = keep & (seg == seg.max(-1, keepdims=True))
    keep = keep[..., None, None]
    count = jnp.maximum(keep.sum(2), 1)
    return jnp.where(keep, xr, 0.0).sum(2) / count


def query_summaries(q, config: MSAttentionConfig, kv_heads: int, num_valid_tokens: int | None = None,
                    segment_ids=None):
    """Query summaries per selection head: q ``[B, T, N, H]`` -> ``float32 [B, R, P, H]``."""
    qbar = region_summaries(q, config.block_size, num_valid_tokens, segment_ids)  # [B, R, N, H]
    if config.selection_heads == "kv":
        # mean_g(q_g . k) == (mean_g q_g) . k: averaging scores over the G heads is averaging the summaries.
        return qbar.reshape(*qbar.shape[:2], kv_heads, qbar.shape[2] // kv_heads, -1).mean(3)
    return qbar


def key_summaries(k, config: MSAttentionConfig, q_heads: int, num_valid_tokens: int | None = None,
                  segment_ids=None):
    """Key summaries per selection head: k ``[B, T, K, H]`` -> ``float32 [B, R, P, H]``."""
    kbar = region_summaries(k, config.block_size, num_valid_tokens, segment_ids)  # [B, R, K, H]
    if config.selection_heads == "kv":
        return kbar
    return jnp.repeat(kbar, q_heads // k.shape[2], axis=2)


def selection_summaries(q, k, config: MSAttentionConfig, num_valid_tokens: int | None = None,
                        segment_ids=None):
    """Query and key summaries per selection head: ``[B, R, P, H]`` each, P = N ("query") or K ("kv")."""
    return (query_summaries(q, config, k.shape[2], num_valid_tokens, segment_ids),
            key_summaries(k, config, q.shape[2], num_valid_tokens, segment_ids))


def segment_ranges(segment_ids, block_size: int):
    """Per region, the smallest and largest segment id of its tokens: ``int32 [B, R]`` each."""
    b, t = segment_ids.shape
    seg = jnp.asarray(segment_ids, jnp.int32).reshape(b, t // block_size, block_size)
    return seg.min(-1), seg.max(-1)


def _candidates(group, num_regions: int, config: MSAttentionConfig):
    """``bool [R]``: candidate regions of the group."""
    j = jnp.arange(num_regions)
    start = group * config.merge
    if config.causal:
        return j < start
    return (j < start) | (j >= start + config.merge)


def _group_plan(group, qbar, kbar, config: MSAttentionConfig, num_valid_regions: int, ranges=None):
    """Selected regions of one group: ``int32 [B, P, M]`` sorted ascending, -1 padded."""
    r, merge = kbar.shape[1], config.merge
    # a short sequence has fewer regions than the budget: every group is dense
    m = min(config.num_selected, r)
    start = group * merge
    if config.selection_source == "previous":
        src = jax.lax.dynamic_slice_in_dim(qbar, jnp.maximum(start - 1, 0), 1, axis=1)  # [B, 1, P, H]
        member_ok = jnp.ones((1,), bool)
    else:
        src = jax.lax.dynamic_slice_in_dim(qbar, start, merge, axis=1)  # [B, merge, P, H]
        member_ok = start + jnp.arange(merge) < num_valid_regions  # padded members do not vote
    cand = _candidates(group, r, config)[None]  # [1 or B, R]
    first = 0  # the region sinks count from
    if ranges is not None:  # packed documents: only regions sharing a segment with the group
        lo, hi = ranges
        glo = jax.lax.dynamic_slice_in_dim(lo, start, merge, axis=1).min(1, keepdims=True)  # [B, 1]
        ghi = jax.lax.dynamic_slice_in_dim(hi, start, merge, axis=1).max(1, keepdims=True)
        cand = cand & (hi >= glo) & (lo <= ghi)
        first = (hi < glo).sum(1, keepdims=True)  # regions of earlier documents
    forced = cand & (jnp.arange(r) - first < config.sink)
    free = (cand & ~forced)[:, None, None, :]  # [1 or B, 1, 1, R]
    scores = jnp.einsum("bmph,brph->bpmr", src, kbar)  # [B, P, members, R], raw dot product
    scores = jnp.where(free, scores, -jnp.inf)
    _, idx = jax.lax.top_k(scores, m)  # [B, P, members, M]; ties -> lower index
    rank = jnp.arange(m)[None, None, None, :]
    member = jnp.arange(src.shape[1])[None, None, :, None]
    prio = rank * merge + member
    ok = jnp.take_along_axis(jnp.broadcast_to(free, scores.shape), idx, -1) & member_ok[None, None, :, None]
    prio = jnp.where(ok, prio, _NO_PRIORITY)
    b, p = scores.shape[:2]
    best = jnp.full((b, p, r), _NO_PRIORITY, jnp.int32)
    bi = jnp.arange(b)[:, None, None, None]
    pi = jnp.arange(p)[None, :, None, None]
    best = best.at[bi, pi, idx].min(prio.astype(jnp.int32))
    best = jnp.where(forced[:, None], -1, best)
    neg, chosen = jax.lax.top_k(-best, m)  # the M smallest priorities
    chosen = jnp.where(neg == -_NO_PRIORITY, r, chosen)
    chosen = jnp.sort(chosen, axis=-1)  # ascending region order: better locality for the kernels
    return jnp.where(chosen == r, -1, chosen).astype(jnp.int32)


def select_regions(q, k, config: MSAttentionConfig, *, num_valid_tokens: int | None = None,
                   segment_ids=None) -> SelectionPlan:
    """Builds the selection plan for q ``[B, T, N, H]`` and k ``[B, T, K, H]`` (T a multiple of W*merge).

    Args:
      q, k: the vectors selection looks at (rotated or not: the caller decides, see positional/).
      config: the attention configuration.
      num_valid_tokens: real length when the tail is internal padding; padding never votes.
      segment_ids: ``int [B, T]`` packed-document ids (see the module docstring); padding should repeat the
        last id.
    """
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    t = q.shape[1]
    if t % config.group_tokens:
        raise ValueError(f"sequence length {t} must be a multiple of block_size*merge={config.group_tokens}")
    qbar, kbar = selection_summaries(q, k, config, num_valid_tokens, segment_ids)
    valid_tokens = t if num_valid_tokens is None else num_valid_tokens
    num_valid_regions = -(-valid_tokens // config.block_size)
    ranges = None if segment_ids is None else segment_ranges(segment_ids, config.block_size)
    regions = plan_rows(qbar, kbar, None, config, num_valid_regions=num_valid_regions, segment_ranges=ranges)
    return SelectionPlan(regions, block_size=config.block_size, merge=config.merge, causal=config.causal)


def plan_rows(qbar, kbar, groups, config: MSAttentionConfig, *, num_valid_regions: int | None = None,
              segment_ranges=None):
    """Selected regions ``int32 [B, P, len(groups), M]`` of the query ``groups`` from summaries
    ``[B, R, P, H]``.

    ``select_regions`` calls it with ``groups=None``, every group in order (``ceil(R / merge)`` of them),
    which lets a causal ``"previous"`` selection score each band of groups against only the regions before
    the band's end (``_causal_bands``); ring attention calls it with its shard's groups only, on all-gathered
    summaries, and gets the same rows; decode calls it with the group being decoded.
    ``segment_ranges``: ``(lo, hi)`` ``int32 [B, R]`` from :func:`segment_ranges` (packed documents).
    """
    b, r, p, _ = kbar.shape
    num_groups = -(-r // config.merge) if groups is None else groups.shape[0]
    if config.num_selected == 0:
        return jnp.full((b, p, num_groups, 1), -1, jnp.int32)
    if config.selection_source == "previous":
        chunk = config.selection_batch or max(1, SCORE_BYTES // (b * p * r * 4))
        rows_of = lambda gs, width, q, k: _previous_rows(gs, q, k, config, segment_ranges, width)
        if groups is None and config.causal:
            return _causal_bands(rows_of, (qbar, kbar), num_groups, chunk, config)
        groups = jnp.arange(num_groups) if groups is None else groups
        return _in_chunks(lambda gs: rows_of(gs, r, qbar, kbar), groups, chunk)
    groups = jnp.arange(num_groups) if groups is None else groups
    regions = jax.lax.map(
        lambda g: _group_plan(g, qbar, kbar, config, r if num_valid_regions is None else num_valid_regions,
                              segment_ranges),
        groups,
        batch_size=min(config.selection_batch or _GROUP_BATCH, num_groups),
    )  # [Q, B, P, M]
    return jnp.moveaxis(regions, 0, 2)


def _causal_bands(rows_of, summaries, num_groups: int, chunk: int, config: MSAttentionConfig):
    """Every group's rows ``[B, P, num_groups, M]``, chunk by chunk as :func:`_in_chunks`, for a causal
    selection: a group's candidates lie before its first region, so a band of consecutive chunks needs the
    scores of the regions before its last group only (``rows_of(groups, width, qbar, kbar)``). Up to
    ``_BANDS`` bands of equally many chunks (each a distinct shape to compile); a single chunk stays one call.
    At 1M tokens (8 chunks of 1,024 groups) four bands score 62.5% of what scoring every region would.
    Each band waits for the one before (an optimization barrier on the summaries), so one band's scores are
    live at a time, as in the ``lax.map`` of :func:`_in_chunks`."""
    regions = summaries[1].shape[1]
    steps = -(-num_groups // chunk)
    per_band = -(-steps // min(steps, _BANDS))
    m = min(config.num_selected, regions)
    bands = []
    for first in range(0, num_groups, per_band * chunk):
        last = min(first + per_band * chunk, num_groups)  # groups [first, last)
        width = (last - 1) * config.merge  # candidates of the band's last group: regions [0, width)
        width = min(regions, max(-(-width // _BAND_ALIGN) * _BAND_ALIGN, m))
        of_chunk = lambda gs, w=width, qk=summaries: rows_of(gs, w, *qk)
        band = _in_chunks(of_chunk, jnp.arange(first, last), chunk)
        bands.append(band)
        summaries = jax.lax.optimization_barrier((band, summaries))[1]
    return jnp.concatenate(bands, axis=2) if len(bands) > 1 else bands[0]


def _in_chunks(rows_of, groups, chunk: int):
    """``rows_of(groups[i:i + chunk])`` ``[B, P, chunk, M]`` over all groups, concatenated along axis 2.

    One call when everything fits one chunk; else ``lax.map`` over equal chunks, the last one padded by
    repeating the final group (its rows are computed and dropped).
    """
    num_groups = groups.shape[0]
    if num_groups <= chunk:
        return rows_of(groups)
    steps = -(-num_groups // chunk)
    padded = jnp.concatenate([groups, jnp.broadcast_to(groups[-1:], (steps * chunk - num_groups,))])
    rows = jax.lax.map(rows_of, padded.reshape(steps, chunk))  # [steps, B, P, chunk, M]
    rows = jnp.moveaxis(rows, 0, 2)  # [B, P, steps, chunk, M]
    return rows.reshape(*rows.shape[:2], steps * chunk, rows.shape[-1])[:, :, :num_groups]


def _top_k(scores, k: int):
    """``lax.top_k`` along the last axis (the ``k`` largest, ties to the lower index); on a GPU, for small
    ``k`` and long rows, :func:`_top_k_rounds` (``lax.top_k`` is a sort of every row there; on a CPU it is
    the faster, and on a GPU at 128 columns: 0.16 ms against 0.34 for a 16K-token layer's selection)."""
    if k > _ROUNDS_TOP_K or scores.shape[-1] < _ROUNDS_MIN_COLUMNS:
        return jax.lax.top_k(scores, k)
    rounds = lambda s: tuple(_top_k_rounds(s, k))
    return jax.lax.platform_dependent(scores, cuda=rounds, rocm=rounds,
                                      default=lambda s: tuple(jax.lax.top_k(s, k)))


def _tile_width(columns: int, k: int) -> int:
    """Columns per tile of :func:`_top_k_rounds`' filter: the power of two nearest ``sqrt(columns / k)``,
    within ``[_MIN_TILE, _MAX_TILE]``. The two stages of rounds read ``columns / tile`` tile maxima and then
    ``k * tile`` kept columns a round, whose sum is least there (1M tokens, 8,192 regions, k = 16: 16, where
    16 and 32 tie; R79 measured both on an H100)."""
    tile = 2 ** round(0.5 * math.log2(max(columns / k, 1)))
    return min(max(tile, _MIN_TILE), _MAX_TILE)


def _top_k_rounds(scores, k: int, tile: int | None = None):
    """``lax.top_k`` along the last axis (the ``k`` largest, ties to the lower index), faster on a GPU for
    small ``k``; the same up to NaN and the sign of zero (``lax.top_k`` ranks +0 above -0, argmax ties them:
    a row holding both picks another zero first, a tie order only). Where a row has fewer than ``k`` entries
    above -inf, which indices fill it (at value -inf) is not specified: callers drop them. (A finite score
    equal to the dtype's lowest value counts as -inf.)

    Rounds of argmax-and-mask (one fused pass over the scores each) instead; with many columns, a tile filter
    first: the k best elements lie in the k tiles of ``tile`` columns (default :func:`_tile_width`) whose
    maxima rank best (a tile outside them has k tiles ranking before it, each holding an element that ranks
    before all of its own), so only those tiles, kept in column order so that ties still go to the lower
    index, go through the rounds. H200, 8 x 1024 rows, k = 16, 8,192 columns, tiles of 128: 5.75 ms
    (lax.top_k), 1.66 (rounds), 0.72 (tile filter + rounds); 1,024 columns: 1.07 vs 0.42
    (``experiments/benchmarks/bench_topk.py``, results R38).
    """
    # -inf entries become the lowest finite value, so that a taken entry (masked to -inf) never ties with
    # an untaken one and no index is taken twice.
    low = jnp.finfo(scores.dtype).min
    scores = jnp.where(scores == -jnp.inf, low, scores)
    *lead, n = scores.shape
    tile = _tile_width(n, k) if tile is None else tile
    tiles = n // tile
    if n % tile or tiles < 2 * k:
        values, indices = _rounds(scores, k)
    else:
        by_tile = scores.reshape(*lead, tiles, tile)
        best = jnp.sort(_rounds(by_tile.max(-1), k)[1], axis=-1)  # [..., k] tiles, in column order
        kept = jnp.take_along_axis(by_tile, best[..., None], axis=-2).reshape(*lead, k * tile)
        values, at = _rounds(kept, k)
        indices = jnp.take_along_axis(best, at // tile, -1) * tile + at % tile
    return jnp.where(values == low, -jnp.inf, values), indices


def _rounds(scores, k: int):
    """The ``k`` largest along the last axis, ties to the lower index, by ``k`` rounds of argmax-and-mask
    (scores above -inf: -inf marks the taken)."""
    j = jnp.arange(scores.shape[-1])
    values, indices = [], []
    for _ in range(k):
        i = jnp.argmax(scores, axis=-1)  # the first of equal maxima: the lower index
        values.append(jnp.take_along_axis(scores, i[..., None], -1)[..., 0])
        indices.append(i)
        scores = jnp.where(j == i[..., None], -jnp.inf, scores)
    return jnp.stack(values, -1), jnp.stack(indices, -1).astype(jnp.int32)


def _previous_rows(groups, qbar, kbar, config: MSAttentionConfig, ranges=None, width: int | None = None):
    """Rows ``int32 [B, P, C, M]`` of the C ``groups`` under the ``"previous"`` rule: one matmul, one top-k.
    ``width``: score only regions ``[0, width)`` (default all), which must hold every candidate of ``groups``
    (:func:`_causal_bands`).

    The same rows as ``_group_plan`` with one member: there a group keeps the candidates of smallest priority,
    forced sinks first, then free candidates by rank; here sinks score +inf and non-candidates -inf, so one
    top-k (ties to the lower index, as there) picks the same set.
    """
    r, merge = kbar.shape[1], config.merge
    m = min(config.num_selected, r)
    width = r if width is None else width
    start = groups * merge  # [C]
    src = jnp.take(qbar, jnp.maximum(start - 1, 0), axis=1, mode="clip")  # [B, C, P, H]: region gs - 1
    j = jnp.arange(width)
    cand = j < start[:, None]  # [C, R]
    if not config.causal:
        cand = cand | (j >= (start + merge)[:, None])
    cand = cand[None]  # [1 or B, C, R]
    first = 0  # the region sinks count from
    if ranges is not None:  # packed documents: only regions sharing a segment with the group
        lo, hi = ranges  # [B, R]
        # the group's regions, the window kept inside [0, R) as _group_plan's dynamic_slice keeps it
        members = jnp.clip(start, 0, r - merge)[:, None] + jnp.arange(merge)  # [C, merge]
        glo = jnp.take(lo, members, axis=1).min(-1)[:, :, None]  # [B, C, 1]
        ghi = jnp.take(hi, members, axis=1).max(-1)[:, :, None]
        cand = cand & (hi[:, None, :width] >= glo) & (lo[:, None, :width] <= ghi)
        first = (hi[:, None] < glo).sum(-1, keepdims=True)  # regions of earlier documents (all R counted)
    forced = cand & (j - first < config.sink)
    scores = jnp.einsum("bcph,brph->bpcr", src, kbar[:, :width])  # [B, P, C, width], raw dot product
    scores = jnp.where(forced[:, None], jnp.inf, jnp.where(cand[:, None], scores, -jnp.inf))
    top, idx = _top_k(scores, m)  # ties -> lower index
    idx = jnp.where(top == -jnp.inf, r, idx)
    idx = jnp.sort(idx, axis=-1)  # ascending: locality for the kernels
    return jnp.where(idx == r, -1, idx).astype(jnp.int32)


def decode_plan_rows(previous_summary, k, positions, config: MSAttentionConfig):
    """The plan row of the query group holding each row's decode position: ``int32 [B, P, M]``.

    The same row as ``select_regions`` on the whole sequence (``plan_rows`` builds both), so a decoded token
    attends exactly what it attended in training. Only ``selection_source="previous"`` can be decoded: a
    ``"group"`` row depends on queries of the group that come after the decoded token.

    Args:
      previous_summary: ``float32 [B, P, H]``: ``query_summaries`` of region ``gs - 1``'s queries (the region
        before the group; any value for the first group, which has no candidate), kept by the decode loop.
      k: ``[B, S, K, H]``: keys with slot = position (an uncompressed cache's ``k`` moved to this layout), S a
        multiple of ``block_size``. Slots at or after the group's start are never read by the row (they are
        not candidates), so they may hold anything, even NaN.
      positions: ``int [B]``: the decoded token's position in each row (ragged rows welcome).
    """
    if config.selection_source != "previous":
        fail("MSAttentionConfig.selection_source", config.selection_source,
             "'previous' at decode (a 'group' row depends on queries after the decoded token)", "'previous'")
    s = k.shape[1]
    if s % config.block_size:
        fail("k.shape[1]", s, f"a multiple of block_size={config.block_size}")
    b, p = previous_summary.shape[:2]
    r = s // config.block_size
    kbar = key_summaries(jax.lax.stop_gradient(k), config, p if config.selection_heads == "query" else 0)
    groups = jnp.asarray(positions, jnp.int32) // config.group_tokens  # [B]
    # Only region gs - 1 of the query summaries is read (selection_source="previous").
    at = jnp.maximum(groups * config.merge - 1, 0)
    qbar = jnp.zeros((b, r, p, previous_summary.shape[-1]), jnp.float32)
    qbar = qbar.at[jnp.arange(b), at].set(jax.lax.stop_gradient(previous_summary).astype(jnp.float32))

    def one_row(qb, kb, g):
        return plan_rows(qb[None], kb[None], g[None], config)[0, :, 0]  # [P, M]

    return jax.vmap(one_row)(qbar, kbar, groups)
