"""Select-and-merge attention over the ring: same plan and same result as single-device ``ms_attention``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_ring import assert_close, count_primitive, make_mesh, out_and_grads, qkv, sharded

from selmerge_jax.attention import MSAttentionConfig, ms_attention, select_regions
from selmerge_jax.sharding.layouts import from_layout, to_layout
from selmerge_jax.sharding.ring_ms import _step_plan, ring_ms_attention, shard_plan_rows

CONFIGS = {
    "gqa_kv_merge2_centroids": MSAttentionConfig(selection_source="group", block_size=4, top_k=4, merge=2,
                                                 selection_heads="kv", centroids=True),
    "query_heads": MSAttentionConfig(selection_source="group", block_size=4, top_k=3),
    "previous_sink": MSAttentionConfig(block_size=4, top_k=4, merge=2, selection_source="previous", sink=1),
    "noncausal": MSAttentionConfig(selection_source="group", block_size=4, top_k=3, causal=False),
}


@pytest.mark.parametrize(("name", "layout"), [
    ("gqa_kv_merge2_centroids", "zigzag"), ("previous_sink", "contiguous"), ("noncausal", "zigzag")])
def test_shard_plan_rows_equal_select_regions(name, layout):
    config, n = CONFIGS[name], 4
    q, k, _ = qkv()
    spec = P("data", "seq")
    rows = jax.jit(jax.shard_map(lambda a, b: shard_plan_rows(a, b, config, axis_name="seq", layout=layout),
                                 mesh=make_mesh(2, n), in_specs=(spec, spec),
                                 out_specs=P("data", None, "seq")))
    got = from_layout(rows(to_layout(q, layout, n), to_layout(k, layout, n)), layout, n, axis=2)
    np.testing.assert_array_equal(got, select_regions(q, k, config).kv_regions)


def test_ring_ms_matches_ms_attention_with_gradients():
    """Contiguous ring of 4 (x2 data), GQA with per-query-head selection: forward and dq/dk/dv."""
    config = CONFIGS["query_heads"]
    q, k, v = qkv()
    ring = sharded(lambda a, b, c: ring_ms_attention(a, b, c, config, axis_name="seq"), make_mesh(2, 4))
    assert_close(out_and_grads(ring, q, k, v, layout="contiguous", num_shards=4),
                 out_and_grads(lambda a, b, c: ms_attention(a, b, c, config), q, k, v))


@pytest.mark.parametrize(("name", "layout", "strategy"), [
    ("query_heads", "zigzag", "allgather"),
    ("gqa_kv_merge2_centroids", "zigzag", "allgather"),
    ("noncausal", "contiguous", "ring"),
])
def test_ring_ms_forward_matches_ms_attention(name, layout, strategy):
    config = CONFIGS[name]
    q, k, v = qkv()
    ring = jax.jit(sharded(lambda a, b, c: ring_ms_attention(a, b, c, config, axis_name="seq", layout=layout,
                                                             strategy=strategy), make_mesh(2, 4)))
    got = from_layout(ring(*(to_layout(x, layout, 4) for x in (q, k, v))), layout, 4)
    assert_close(got, ms_attention(q, k, v, config))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layout", "strategy"), [
    ("previous_sink", "zigzag", "ring"), ("gqa_kv_merge2_centroids", "contiguous", "allgather"),
    ("noncausal", "zigzag", "ring")])
def test_ring_ms_more_configs_with_gradients(name, layout, strategy):
    config = CONFIGS[name]
    q, k, v = qkv()
    ring = sharded(lambda a, b, c: ring_ms_attention(a, b, c, config, axis_name="seq", layout=layout,
                                                     strategy=strategy), make_mesh(2, 4))
    assert_close(out_and_grads(ring, q, k, v, layout=layout, num_shards=4),
                 out_and_grads(lambda a, b, c: ms_attention(a, b, c, config), q, k, v))


def test_causal_contiguous_ring_skips_later_shards():
    """Device i never needs a KV shard from a later device; with enough selection it needs every other one."""
    # 8 selected regions: more than a shard's 4
    config, n = MSAttentionConfig(selection_source="group", block_size=4, top_k=9), 4
    q, k, _ = qkv()

    def needed(a, b):
        rows = shard_plan_rows(a, b, config, axis_name="seq")
        flags = [_step_plan(rows, origin, False, config=config, layout="contiguous", n=n, regions=4)[1]
                 for origin in range(n)]
        return jnp.stack(flags)[None]

    spec = P(None, "seq")
    got = jax.jit(jax.shard_map(needed, mesh=make_mesh(1, n), in_specs=(spec, spec), out_specs=P("seq")))(q,
                                                                                                          k)
    np.testing.assert_array_equal(got, np.tril(np.ones((n, n), bool)))  # origin <= device


def test_forward_ring_ms_has_devices_minus_one_kv_ppermutes():
    q, k, v = qkv()
    ring = sharded(lambda a, b, c: ring_ms_attention(a, b, c, CONFIGS["query_heads"], axis_name="seq"),
                   make_mesh(1, 8))
    assert count_primitive(jax.make_jaxpr(ring)(q, k, v).jaxpr, "ppermute") == 7


def test_bad_local_length_raises():
    q, k, v = qkv(t=24)  # 12 tokens per shard: not a multiple of 2 chunks x block_size 4 x merge 2
    ring = sharded(lambda a, b, c: ring_ms_attention(a, b, c, CONFIGS["previous_sink"], axis_name="seq",
                                                     layout="zigzag"), make_mesh(1, 2))
    with pytest.raises(ValueError, match="multiple of 16"):
        jax.eval_shape(ring, q, k, v)
