"""The one-matmul ``"previous"`` selection (``selection._previous_rows``) against the general per-group rule
(``selection._group_plan``, which ranks each member and merges by priority): the same rows for every knob."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention import MSAttentionConfig, selection
from selmerge_jax.attention.selection import _group_plan, plan_rows, segment_ranges

B, R, P, H = 2, 24, 3, 4


def _general_rows(qbar, kbar, groups, config, ranges):
    rows = jax.lax.map(lambda g: _group_plan(g, qbar, kbar, config, kbar.shape[1], ranges), groups)
    return jnp.moveaxis(rows, 0, 2)  # [B, P, Q, M]


def _summaries(seed, ties):
    rng = np.random.default_rng(seed)
    if ties:  # small integers: many equal scores, so the tie rule (lower index first) decides
        return (jnp.asarray(rng.integers(-1, 2, (B, R, P, H)), jnp.float32),
                jnp.asarray(rng.integers(-1, 2, (B, R, P, H)), jnp.float32))
    return (jnp.asarray(rng.normal(size=(B, R, P, H)), jnp.float32),
            jnp.asarray(rng.normal(size=(B, R, P, H)), jnp.float32))


def _packed_ranges(merge, block=4):
    """Two rows of packed documents: row 0 one document, row 1 documents starting mid-region."""
    ids = np.zeros((B, R * block), np.int32)
    for start in (13, 40, 41, 70):
        ids[1, start:] += 1
    return segment_ranges(jnp.asarray(ids), block)


@pytest.mark.parametrize("causal,merge,sink,packed,ties", [
    *itertools.product([True], [1, 2, 4], [0, 2], [False, True], [False, True]),
    (False, 1, 0, False, False), (False, 2, 1, False, True), (False, 4, 2, True, False),
])
def test_previous_rows_equal_the_general_rule(causal, merge, sink, packed, ties):
    config = MSAttentionConfig(block_size=4, top_k=merge * 3, merge=merge, sink=sink, causal=causal,
                               selection_source="previous", selection_heads="kv")
    qbar, kbar = _summaries(merge * 10 + sink, ties)
    ranges = _packed_ranges(merge) if packed else None
    groups = jnp.arange(R // merge)
    want = _general_rows(qbar, kbar, groups, config, ranges)
    got = plan_rows(qbar, kbar, groups, config, segment_ranges=ranges)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch", [1, 5, None])
def test_previous_rows_do_not_depend_on_the_chunking(batch):
    """Chunks of 1 and 5 groups (the last chunk padded), or one chunk: the same rows, for any group subset."""
    config = MSAttentionConfig(block_size=4, top_k=5, sink=1, selection_source="previous",
                               selection_batch=batch)
    qbar, kbar = _summaries(7, False)
    groups = jnp.asarray([21, 3, 0, 17, 9, 10, 11])  # a ring shard's or a decode batch's groups, any order
    want = _general_rows(qbar, kbar, groups, config, None)
    np.testing.assert_array_equal(plan_rows(qbar, kbar, groups, config), want)


@pytest.mark.parametrize("causal,merge,batch,align,packed", [
    (True, 1, 1, 1, False), (True, 1, 5, 1, True), (True, 2, 2, 4, False), (True, 4, 1, 1, True),
    (True, 1, 3, 128, False), (True, 1, None, 1, False), (False, 2, 2, 1, True),
])
def test_every_group_in_causal_bands_equals_the_general_rule(monkeypatch, causal, merge, batch, align,
                                                             packed):
    """``groups=None`` (what select_regions passes): causal bands of chunks, each scoring only the regions
    before its end (widths aligned to 1, 4 or 128 regions, the last wider than R), up to 3 bands of up to 2
    chunks; the same rows as the general rule over every group."""
    monkeypatch.setattr(selection, "_BAND_ALIGN", align)
    monkeypatch.setattr(selection, "_BANDS", 3)
    config = MSAttentionConfig(block_size=4, top_k=merge * 3, merge=merge, sink=1, causal=causal,
                               selection_source="previous", selection_batch=batch)
    qbar, kbar = _summaries(merge + 20, False)
    ranges = _packed_ranges(merge) if packed else None
    want = _general_rows(qbar, kbar, jnp.arange(R // merge), config, ranges)
    got = jax.jit(lambda q, k: plan_rows(q, k, None, config, segment_ranges=ranges))(qbar, kbar)
    np.testing.assert_array_equal(got, want)


def test_a_budget_larger_than_the_candidates_keeps_every_candidate():
    config = MSAttentionConfig(block_size=4, top_k=40, selection_source="previous")
    qbar, kbar = _summaries(3, False)
    rows = np.asarray(plan_rows(qbar, kbar, jnp.arange(R), config))  # M = min(39, R) = 24
    for g in range(R):
        np.testing.assert_array_equal(rows[:, :, g, :g], np.broadcast_to(np.arange(g), (B, P, g)))
        assert (rows[:, :, g, g:] == -1).all()


def _scores(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "ties":
        x = rng.integers(-3, 3, shape).astype(np.float32)
    else:
        x = rng.normal(size=shape).astype(np.float32)
    x[..., 0, :] = -np.inf  # a row with no candidate
    x[..., 1, ::7] = -np.inf  # sparse candidates
    x[..., 2, 5:9] = np.inf  # forced sinks
    x[..., 3, :] = np.where(np.arange(shape[-1]) < 20, x[..., 3, :], -np.inf)  # fewer than k in one tile
    return jnp.asarray(x)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("columns,k,tile", [(64, 16, None), (1024, 16, None), (1024, 16, 128),
                                            (128 * 32, 16, None), (128 * 32, 16, 128), (128 * 40, 5, None),
                                            (4096, 24, None), (4096, 16, 8), (4096, 16, 64)])
def test_top_k_rounds_equal_lax_top_k(kind, columns, k, tile):
    """Values and indices (of the entries above -inf), in order: rounds (few columns, or fewer than 2k
    tiles) and the tile filter (the default width and others); ties, -inf rows, +inf entries and candidates
    confined to one tile included."""
    scores = _scores(kind, (2, 6, columns), seed=columns + k)
    want_v, want_i = jax.lax.top_k(scores, k)
    got_v, got_i = jax.jit(lambda s: selection._top_k_rounds(s, k, tile))(scores)  # what a GPU runs
    np.testing.assert_array_equal(got_v, want_v)
    real = np.asarray(want_v) > -np.inf  # which -inf entry fills a short row is not specified
    np.testing.assert_array_equal(np.where(real, got_i, -1), np.where(real, want_i, -1))


@pytest.mark.parametrize("columns,k,want", [(64, 16, 8), (1024, 16, 8), (8192, 16, 16), (32768, 16, 64),
                                            (1 << 20, 16, 128), (5120, 5, 32)])
def test_tile_width_balances_the_two_stages(columns, k, want):
    """The power of two nearest sqrt(columns / k), within [8, 128]."""
    assert selection._tile_width(columns, k) == want


def test_previous_rows_with_the_tile_filter_equal_the_general_rule(monkeypatch):
    """R = 4096 regions, the GPU's top-k (here on the CPU): through the tile filter, the per-group rows."""
    monkeypatch.setattr(selection, "_top_k", selection._top_k_rounds)
    r = 4096
    rng = np.random.default_rng(5)
    qbar = jnp.asarray(rng.integers(-2, 3, (1, r, 2, 4)), jnp.float32)  # integer summaries: many ties
    kbar = jnp.asarray(rng.integers(-2, 3, (1, r, 2, 4)), jnp.float32)
    config = MSAttentionConfig(block_size=4, top_k=17, sink=1, selection_source="previous")
    groups = jnp.asarray([0, 1, 17, 129, 2048, 4000, 4095])
    want = _general_rows(qbar, kbar, groups, config, None)
    np.testing.assert_array_equal(jax.jit(lambda q, k: plan_rows(q, k, groups, config))(qbar, kbar), want)


def test_a_last_group_past_the_regions_keeps_the_window_inside_like_the_general_rule():
    """R = 22 regions, merge 4: the last group's window would end past R; both rules clamp it inside."""
    qbar, kbar = (x[:, :22] for x in _summaries(11, False))
    ids = np.zeros((B, 22), np.int32)
    ids[1, 20:] = 1  # row 1: a document starting at region 20, inside the clamped window [18, 22) only
    ranges = (jnp.asarray(ids), jnp.asarray(ids))
    config = MSAttentionConfig(block_size=4, top_k=12, merge=4, sink=1, selection_source="previous")
    groups = jnp.arange(6)  # group 5 starts at region 20
    want = _general_rows(qbar, kbar, groups, config, ranges)
    np.testing.assert_array_equal(plan_rows(qbar, kbar, groups, config, segment_ranges=ranges), want)
