"""The two oracles: dense attention and the plan-driven block-sparse reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention import SelectionPlan, dense_attention
from selmerge_jax.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_causal_plan,
)


def _qkv(key, b=1, t=32, s=None, n=4, kh=2, h=8):
    kq, kk, kv = jax.random.split(key, 3)
    s = t if s is None else s
    return (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, s, kh, h)),
            jax.random.normal(kv, (b, s, kh, h)))


def _naive(q, k, v, mask):
    """Per-head loops in numpy float64: nothing shared with the code under test."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, _, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            s = q[bi, :, ni] @ k[bi, :, ni // g].T / np.sqrt(h)
            s = np.where(mask[bi], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, :, ni] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, ni // g]
    return out


@pytest.mark.parametrize("t,s", [(32, 32), (8, 32)])
def test_dense_matches_naive_causal_bottom_right(t, s, key):
    q, k, v = _qkv(key, b=2, t=t, s=s)
    mask = np.broadcast_to(np.arange(s)[None] <= np.arange(t)[:, None] + s - t, (2, t, s))
    np.testing.assert_allclose(dense_attention(q, k, v), _naive(q, k, v, mask), atol=1e-5)
    np.testing.assert_allclose(dense_attention(q, k, v, causal=False),
                               _naive(q, k, v, np.ones((2, t, s), bool)),
                               atol=1e-5)


def test_dense_segment_ids_and_lse(key):
    q, k, v = _qkv(key, b=2)
    seg = jnp.array([[0] * 10 + [1] * 22, [0] * 32])
    mask = (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]) & np.tril(np.ones((32, 32), bool))
    out, lse = dense_attention(q, k, v, segment_ids=seg, return_lse=True)
    np.testing.assert_allclose(out, _naive(q, k, v, mask), atol=1e-5)
    logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(8)
    want = jax.nn.logsumexp(jnp.where(mask[:, None], logits, -jnp.inf), -1).transpose(0, 2, 1)
    np.testing.assert_allclose(lse, want, atol=1e-5)


def test_dense_fully_masked_rows_are_zero_not_nan(key):
    q, k, v = _qkv(key, b=1, t=8, s=8)
    seg_q = jnp.array([[0] * 8])
    out = dense_attention(q, k, v, causal=False, segment_ids=seg_q)
    assert jnp.isfinite(out).all()
    out = dense_attention(q[:, :4], k, v, causal=True)  # T < S: all rows see something
    assert jnp.isfinite(out).all()


def test_dense_gqa_equals_repeated_kv(key):
    q, k, v = _qkv(key, n=8, kh=2)
    np.testing.assert_allclose(dense_attention(q, k, v),
                               dense_attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2)),
                               atol=1e-6)


@pytest.mark.parametrize("merge", [1, 2])
@pytest.mark.parametrize("heads", ["kv", "query"])
def test_block_sparse_with_dense_plan_equals_dense(merge, heads, key):
    q, k, v = _qkv(key, b=2, t=64, n=4, kh=2)
    plan = dense_causal_plan(2, 2 if heads == "kv" else 4, 64, block_size=8, merge=merge)
    out, lse = block_sparse_attention_reference(q, k, v, plan, return_lse=True)
    want, want_lse = dense_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_block_sparse_ragged_plan_and_invalid_entries(key):
    q, k, v = _qkv(key, t=32, n=2, kh=1)
    # groups of one 8-token region; group 3 selects regions {0, 2}; padding, a future and a local index
    # ignored
    regions = jnp.array([[[[-1, -1, -1], [0, -1, 3], [1, 2, -1], [2, 0, 3]]]], jnp.int32)
    plan = SelectionPlan(regions, block_size=8, merge=1)
    mask = np.zeros((1, 32, 32), bool)
    for grp, sel in enumerate([[], [0], [1], [0, 2]]):
        rows = slice(8 * grp, 8 * grp + 8)
        for r in sel:
            mask[0, rows, 8 * r:8 * r + 8] = True
        mask[0, rows, rows] = np.tril(np.ones((8, 8), bool))
    np.testing.assert_allclose(block_sparse_attention(q, k, v, plan), _naive(q, k, v, mask), atol=1e-5)
    assert np.asarray(plan.attended_tokens()).tolist() == [[[0, 8, 8, 16]]]


def test_block_sparse_row_with_nothing_to_attend_is_zero(key):
    q, k, v = _qkv(key, t=16, n=2, kh=2)
    regions = jnp.array([[[[-1], [0]], [[-1], [-1]]]], jnp.int32)
    plan = SelectionPlan(regions, block_size=8, merge=1, include_local=False)
    out, lse = block_sparse_attention_reference(q, k, v, plan, return_lse=True)
    assert jnp.isfinite(out).all()
    np.testing.assert_array_equal(out[:, :8], 0.0)
    np.testing.assert_array_equal(out[:, 8:, 1], 0.0)
    assert jnp.isneginf(lse[:, :8]).all() and jnp.isfinite(lse[:, 8:, 0]).all()
    grads = jax.grad(lambda q: block_sparse_attention_reference(q, k, v, plan).sum())(q)
    assert jnp.isfinite(grads).all()


def test_nan_in_unselected_regions_does_not_leak(key):
    q, k, v = _qkv(key, t=32, n=2, kh=1)
    regions = jnp.array([[[[-1], [0], [0], [1]]]], jnp.int32)  # region 2 is never selected by group 3
    plan = SelectionPlan(regions, block_size=8, merge=1)
    k_bad = k.at[:, 16:24].set(jnp.nan)
    v_bad = v.at[:, 16:24].set(jnp.nan)
    out = block_sparse_attention(q, k_bad, v_bad, plan)
    assert jnp.isfinite(out[:, 24:]).all() and jnp.isfinite(out[:, :16]).all()
    np.testing.assert_allclose(out[:, 24:], block_sparse_attention(q, k, v, plan)[:, 24:], atol=1e-6)


def test_block_sparse_is_bitwise_deterministic(key):
    q, k, v = _qkv(key, t=64)
    plan = dense_causal_plan(1, 2, 64, block_size=8)
    f = jax.jit(lambda q, k, v: jax.value_and_grad(lambda q: block_sparse_attention(q, k, v, plan).sum())(q))
    a, b = f(q, k, v), f(q, k, v)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_plan_and_input_validation(key):
    q, k, v = _qkv(key, t=32)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        SelectionPlan(jnp.zeros((1, 2, 4, 1), jnp.int32), block_size=0, merge=1)
    plan = dense_causal_plan(1, 2, 32, block_size=8)
    with pytest.raises(ValueError, match="q length 16"):
        block_sparse_attention(q[:, :16], k[:, :16], v[:, :16], plan)
    with pytest.raises(ValueError, match=r"plan\.kv_regions"):
        block_sparse_attention(q, k, v, dense_causal_plan(1, 3, 32, block_size=8))
    with pytest.raises(TypeError, match="integer"):
        block_sparse_attention(q, k, v,
                               SelectionPlan(plan.kv_regions.astype(jnp.float32), block_size=8, merge=1))
    with pytest.raises(ValueError, match="implementation='cuda_magic' is unknown"):
        block_sparse_attention(q, k, v, plan, implementation="cuda_magic")
    with pytest.raises(ValueError, match="seq_len=30"):
        dense_causal_plan(1, 2, 30, block_size=8)
