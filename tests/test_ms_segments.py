"""Packed documents (``segment_ids``) with select-and-merge attention: each document gets exactly what it gets
alone (forward and gradients), nothing crosses documents, and backends without a segment mask decline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention import MSAttentionConfig, dense_attention, ms_attention
from selmerge_jax.kernels.block_sparse_attention import block_sparse_attention, dense_causal_plan

N, K, H = 4, 2, 8
L1 = L2 = 40  # document lengths, multiples of block_size * merge = 8 (equal: one compile alone)
CONFIGS = {
    "group_merge2_sink": MSAttentionConfig(block_size=4, top_k=6, merge=2, sink=1),
    "previous_kv_centroids": MSAttentionConfig(block_size=4, top_k=6, merge=2, selection_source="previous",
                                               selection_heads="kv", centroids=True),
    "w8_centroids_sink": MSAttentionConfig(block_size=8, top_k=3, centroids=True, sink=1),
}


def _inputs(t, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((1, t, N, H), (1, t, K, H),
                                                                           (1, t, K, H), (1, t, N, H)))


def _out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_documents_equal_each_document_alone(name):
    config = CONFIGS[name]
    q, k, v, do = _inputs(L1 + L2)
    seg = jnp.asarray(np.r_[np.zeros(L1, int), np.ones(L2, int)])[None]
    packed = jax.jit(lambda q, k, v, do: _out_and_grads(
        lambda a, b, c: ms_attention(a, b, c, config, segment_ids=seg), q, k, v, do))(q, k, v, do)
    alone = jax.jit(lambda q, k, v, do: _out_and_grads(lambda a, b, c: ms_attention(a, b, c, config),
                                                       q, k, v, do))
    for doc in (slice(0, L1), slice(L1, L1 + L2)):
        want = alone(q[:, doc], k[:, doc], v[:, doc], do[:, doc])
        for what, a, b in zip(("out", "dq", "dk", "dv"), packed, want):
            np.testing.assert_allclose(a[:, doc], b, rtol=1e-5, atol=1e-5, err_msg=f"{what} {doc}")


def test_nothing_crosses_documents_that_start_mid_region():
    """Documents of 30 and 34 tokens (the boundary inside a region and a group), centroids on: changing every
    q/k/v of the first document leaves the second one's outputs unchanged, and vice versa."""
    config = CONFIGS["previous_kv_centroids"]
    q, k, v, _ = _inputs(64, seed=1)
    seg = jnp.asarray(np.r_[np.zeros(30, int), np.ones(34, int)])[None]
    run = jax.jit(lambda q, k, v: ms_attention(q, k, v, config, segment_ids=seg))
    base = np.asarray(run(q, k, v))
    for doc, other in ((slice(0, 30), slice(30, 64)), (slice(30, 64), slice(0, 30))):
        noisy = [x.at[:, doc].add(3.0) for x in (q, k, v)]
        np.testing.assert_allclose(np.asarray(run(*noisy))[:, other], base[:, other], rtol=1e-5, atol=1e-5)


def test_block_sparse_segment_mask_equals_dense_and_pallas_backends_decline():
    """With every earlier region selected, the op's segment mask is dense attention's; a backend without a
    segment mask declines (naming it), pallas_triton off its GPU declines like any call, and an explicit
    fallback list reaches ``"xla"``."""
    q, k, v, _ = _inputs(64, seed=2)
    seg = jnp.asarray(np.r_[np.zeros(20, int), np.ones(25, int), np.full(19, 2)])[None]
    plan = dense_causal_plan(1, K, 64, 8, merge=2)
    want = dense_attention(q, k, v, segment_ids=seg)
    np.testing.assert_allclose(block_sparse_attention(q, k, v, plan, segment_ids=seg), want, rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(NotImplementedError, match="pallas_mosaic_tpu: no segment_ids"):
        block_sparse_attention(q, k, v, plan, segment_ids=seg, implementation="pallas_mosaic_tpu")
    with pytest.raises(NotImplementedError, match="pallas_triton: pallas_triton needs a GPU"):
        block_sparse_attention(q, k, v, plan, segment_ids=seg, implementation="pallas_triton")
    got = block_sparse_attention(q, k, v, plan, segment_ids=seg, implementation=("pallas_mosaic_tpu", "xla"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"segment_ids=\(1, 63\)"):
        block_sparse_attention(q, k, v, plan, segment_ids=seg[:, 1:])
