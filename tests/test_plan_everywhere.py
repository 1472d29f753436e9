"""One plan, everywhere: single-device selection, the ring (each shard plans only its own query groups) and
decode (one group's row from the cache) build their rows with the same ``plan_rows``: the same plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jaxpr_walk import equations
from test_ring import make_mesh

from selmerge_jax.attention import MSAttentionConfig, ms_attention, select_regions
from selmerge_jax.attention.selection import SCORE_BYTES, decode_plan_rows, query_summaries
from selmerge_jax.kvcache import append, init_cache
from selmerge_jax.kvcache.query_select import attend_plan_row, ms_plan_rows
from selmerge_jax.sharding.ring_ms import shard_plan_rows

B, T, N, K, H = 2, 128, 4, 2, 8
CONFIGS = {  # decodable ones ("previous"): a "group" row depends on queries after the decoded token
    "kv_merge2_sink": MSAttentionConfig(block_size=4, top_k=6, merge=2, selection_source="previous",
                                        selection_heads="kv", sink=1),
    "query_heads": MSAttentionConfig(block_size=8, top_k=4, selection_source="previous"),
}


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((B, T, N, H), (B, T, K, H),
                                                                           (B, T, K, H)))


def _valid_sets(rows):
    """Each row's valid entries as a sorted tuple (row widths may differ: M = min(top_k - merge, R))."""
    rows = np.asarray(rows)
    return [tuple(sorted(x[x >= 0])) for x in rows.reshape(-1, rows.shape[-1])]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_plan_on_one_device_in_the_ring_and_at_decode(name):
    config = CONFIGS[name]
    q, k, _ = _qkv()
    single = np.asarray(select_regions(q, k, config).kv_regions)  # [B, P, Q, M]
    spec = P(None, "seq")
    ring = jax.jit(jax.shard_map(lambda a, b: shard_plan_rows(a, b, config, axis_name="seq"),
                                 mesh=make_mesh(1, 8), in_specs=(spec, spec), out_specs=P(None, None, "seq")))
    np.testing.assert_array_equal(np.asarray(ring(q, k)), single)

    # Decode: every group at once (one decode row per (batch row, group)), at a random position inside the
    # group, keys after the position never written (NaN where they would be: the row must not read them).
    lt, groups = config.group_tokens, T // config.group_tokens
    qs = query_summaries(q, config, K)  # [B, R, P, H]
    g = np.tile(np.arange(groups), B)
    b = np.repeat(np.arange(B), groups)
    pos = g * lt + np.random.default_rng(1).integers(0, lt, g.size)
    prev = qs[b, np.maximum(g * config.merge - 1, 0)]  # [B*Q, P, H]
    k_seen = jnp.where(jnp.arange(T)[None, :, None, None] <= pos[:, None, None, None], k[b], jnp.nan)
    got = jax.jit(decode_plan_rows, static_argnums=3)(prev, k_seen, jnp.asarray(pos), config)  # [B*Q, P, M]
    want = single.transpose(0, 2, 1, 3).reshape(B * groups, single.shape[1], -1)
    assert _valid_sets(got) == _valid_sets(want)


def test_decoding_a_token_attends_what_training_attended():
    """The cache-side API: the row from the cache and the attention over it give ms_attention's output.
    Four decode positions per batch row, each its own cache row holding the tokens up to it (slot = position,
    later slots empty)."""
    config = CONFIGS["kv_merge2_sink"]
    q, k, v = _qkv(2)
    want = np.asarray(ms_attention(q, k, v, config))
    t = np.array([5, 37, 90, 127] * B)
    b = np.repeat(np.arange(B), 4)
    cache = append(init_cache(t.size, K, T, H, dtype=jnp.float32), k[b], v[b],
                   jnp.where(jnp.arange(T)[None] <= t[:, None], jnp.arange(T)[None], -1))
    prev = query_summaries(q, config, K)[b, np.maximum(t // config.group_tokens * config.merge - 1, 0)]
    step = jax.jit(lambda cache, prev, q_t, pos: attend_plan_row(
        cache, q_t, pos[:, None], ms_plan_rows(cache, prev, pos, config), config))
    got = step(cache, prev, q[b, t][:, None], jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got)[:, 0], want[b, t], rtol=2e-5, atol=2e-5)


def test_decode_refuses_group_selection():
    config = MSAttentionConfig(block_size=4, top_k=4, selection_source="group")
    with pytest.raises(ValueError, match="selection_source='group'"):
        decode_plan_rows(jnp.zeros((B, N, H)), jnp.zeros((B, T, K, H)), jnp.zeros((B,), jnp.int32), config)


def _avals(jaxpr):
    """Every intermediate's shape in a jaxpr, sub-jaxprs (lax.map's scan, top_k's pieces) included."""
    return (v.aval.shape for eqn in equations(jaxpr) for v in eqn.outvars)


def _selection_temp(config, r, block, q_heads, kv_heads, head_dim=8):
    q = jax.ShapeDtypeStruct((1, r * block, q_heads, head_dim), jnp.float32)
    k = jax.ShapeDtypeStruct((1, r * block, kv_heads, head_dim), jnp.float32)
    fn = lambda q, k: select_regions(q, k, config).kv_regions
    shapes = list(_avals(jax.make_jaxpr(fn)(q, k).jaxpr))
    return shapes, jax.jit(fn).lower(q, k).compile().memory_analysis().temp_size_in_bytes


def test_selection_at_scale_builds_no_regions_by_regions_array():
    """R = 4096 regions (64K tokens of W = 16) with 16 groups a step: no intermediate has two R-sized axes
    (selection walks the query groups in chunks), and the compiled temporaries stay far below one R x R
    float32 matrix (64 MiB)."""
    config = MSAttentionConfig(block_size=16, top_k=8, merge=2, selection_source="previous",
                               selection_heads="kv", selection_batch=16)
    r = 4096
    shapes, temp = _selection_temp(config, r, 16, 2, 1)
    assert shapes and not [s for s in shapes if sum(d >= r for d in s) >= 2]
    assert temp < r * r * 4 / 16, temp


def test_selection_at_1m_stays_within_its_score_budget():
    """The default chunking at 1M tokens (R = 8192 regions of 128, 8 kv heads): a step's scores are at most
    ``SCORE_BYTES``, so the temporaries are a few of those, far below the 2 GiB score matrix of the layer."""
    config = MSAttentionConfig(block_size=128, top_k=17, selection_source="previous", selection_heads="kv")
    r, p = 8192, 8
    shapes, temp = _selection_temp(config, r, 128, 4 * p, p)
    assert not [s for s in shapes if sum(d >= r for d in s) >= 2], "an R x R intermediate"
    assert temp <= 3 * SCORE_BYTES < r * r * p * 4, temp
