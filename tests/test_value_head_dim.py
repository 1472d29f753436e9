"""Values with a head dim of their own (MLA-style: q/k ``[.., H]``, v ``[.., Hv]``, ``Hv != H``).

The references (dense and block-sparse) take such inputs as they are; ``block_sparse_attention`` hands every
other backend q, k and v zero-padded to one power-of-two head dim and slices the output back
(``api._call``), so a kernel that knows one head dim (here the Triton kernels in the Pallas interpreter, which
refuse unequal k/v shapes when called directly) gives the reference's output, LSE and gradients.
``ms_attention`` (selection on q/k, centroids of k and v) follows.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.attention import MSAttentionConfig, dense_attention, ms_attention
from selmerge_jax.kernels.block_sparse_attention import (
    api,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_causal_plan,
)
from selmerge_jax.kernels.block_sparse_attention.pallas_triton import block_sparse_attention_triton

B, T, N, K, W = 1, 128, 4, 2, 32


def _qkv(h: int, hv: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    normal = functools.partial(jax.random.normal, dtype=jnp.float32)
    return normal(kq, (B, T, N, h)), normal(kk, (B, T, K, h)), normal(kv, (B, T, K, hv))


def _numpy_causal(q, k, v):
    """Softmax(q k^T / sqrt(H)) v with a causal mask and GQA, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = N // K
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for n in range(N):
        s = q[0, :, n] @ k[0, :, n // g].T / math.sqrt(q.shape[3])
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[0, :, n] = (p / p.sum(-1, keepdims=True)) @ v[0, :, n // g]
    return out


@pytest.mark.parametrize(("h", "hv"), [(16, 8), (8, 24)])
def test_dense_and_block_sparse_references_take_a_value_head_dim_of_their_own(h, hv):
    q, k, v = _qkv(h, hv)
    want = _numpy_causal(q, k, v)
    np.testing.assert_allclose(dense_attention(q, k, v), want, rtol=1e-5, atol=1e-5)
    plan = dense_causal_plan(B, K, T, block_size=W)
    out = block_sparse_attention_reference(q, k, v, plan)
    assert out.shape == (B, T, N, hv)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def strict_triton(monkeypatch):
    """A backend that knows one head dim: the Triton kernels in the Pallas interpreter, registered as
    ``"strict"`` (called directly they refuse v shaped unlike k)."""
    monkeypatch.setitem(api.IMPLEMENTATIONS, "strict",
                        functools.partial(block_sparse_attention_triton, interpret=True))
    return "strict"


def _out_lse_grads(impl, q, k, v, plan):
    def f(q, k, v):
        out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, implementation=impl)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse)), (out, lse)

    grads, (out, lse) = jax.grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (out, lse, *grads)


# narrower values (v padded), wider values (q/k padded, the scale stays 1/sqrt(H)), neither a power of two
@pytest.mark.parametrize(("h", "hv"), [(32, 16), (16, 32), (48, 32)])
def test_a_kernel_of_one_head_dim_gets_padded_inputs_and_matches_the_reference(strict_triton, h, hv):
    q, k, v = _qkv(h, hv, seed=1)
    plan = dense_causal_plan(B, K, T, block_size=W)
    got = _out_lse_grads(strict_triton, q, k, v, plan)
    want = _out_lse_grads("xla", q, k, v, plan)
    assert got[0].shape == (B, T, N, hv) and got[4].shape == v.shape
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)


def test_ms_attention_with_centroids_takes_a_value_head_dim_of_its_own(strict_triton):
    """The narrow values give what zero-padding them to q/k's head dim gives, sliced back (each output column
    depends on its own value column only), through the reference and through a padded kernel."""
    q, k, v = _qkv(16, 8, seed=2)
    cfg = MSAttentionConfig(block_size=W, top_k=2, centroids=True)
    wide = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, 8)))
    want = ms_attention(q, k, wide, cfg, implementation="xla")[..., :8]
    np.testing.assert_allclose(ms_attention(q, k, v, cfg, implementation="xla"), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ms_attention(q, k, v, cfg, implementation=strict_triton), want, rtol=2e-4,
                               atol=2e-4)


def _pad_v(v, to: int):
    return jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, to - v.shape[3])))


def test_dense_attention_with_narrow_values_is_the_wide_one_sliced_with_every_option():
    """Non-causal, packed documents, LSE: each output column depends on its own value column only."""
    q, k, v = _qkv(16, 8, seed=3)
    seg = jnp.asarray(np.repeat([0, 1, 2, 3], T // 4)[None], jnp.int32)
    for kw in ({"causal": False}, {"segment_ids": seg}, {"causal": False, "segment_ids": seg}):
        out, lse = dense_attention(q, k, v, return_lse=True, **kw)
        wide, wide_lse = dense_attention(q, k, _pad_v(v, 16), return_lse=True, **kw)
        np.testing.assert_allclose(out, wide[..., :8], rtol=1e-6, atol=1e-6, err_msg=str(kw))
        np.testing.assert_allclose(lse, wide_lse, rtol=1e-6, err_msg=str(kw))


def test_packed_documents_through_a_padded_kernel(strict_triton):
    q, k, v = _qkv(32, 16, seed=4)
    seg = jnp.asarray(np.repeat([0, 1], T // 2)[None], jnp.int32)
    plan = dense_causal_plan(B, K, T, block_size=W)
    got = block_sparse_attention(q, k, v, plan, implementation=strict_triton, segment_ids=seg)
    want = block_sparse_attention_reference(q, k, v, plan, segment_ids=seg)  # Hv as it is, no padding
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_values_must_agree_with_keys_on_everything_but_the_head_dim():
    q, k, _ = _qkv(16, 8)
    plan = dense_causal_plan(B, K, T, block_size=W)
    other_heads = jnp.zeros((B, T, K * 2, 8))
    with pytest.raises(ValueError, match=r"v \[B, S, K, Hv\] must agree with k \[B, S, K, H\] on B, S and K"):
        block_sparse_attention(q, k, other_heads, plan)
    with pytest.raises(ValueError, match=r"must agree with k"):
        dense_attention(q, k, other_heads)
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):  # a kernel called directly
        block_sparse_attention_triton(q, k, jnp.zeros((B, T, K, 8)), plan, interpret=True)
