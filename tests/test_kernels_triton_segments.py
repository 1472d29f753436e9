"""Packed documents in the Pallas Triton kernels (interpret mode): with ``segment_ids`` the forward, dQ and
dK/dV passes mask pairs of different documents exactly as the pure-jnp reference does, document boundaries
inside blocks, groups and tiles included; per-kv-head and per-query-head plans (GQA), no local block, NaN
padding, bitwise determinism; and the dispatcher sends segment calls to the kernel instead of declining."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_base import NAMES, cotangent_run, inputs

from selmerge_jax.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
)
from selmerge_jax.kernels.block_sparse_attention.pallas_triton import (
    TritonTiling,
    block_sparse_attention_triton,
)

_TINY = TritonTiling(rows_fwd=32, block_k_fwd=32, rows_dq=32, block_k_dq=16, rows_dkv=16, block_k_dkv=32)


def _segments(batch, t, seed):
    """``int32 [B, T]``: 3-5 documents per row with boundaries at random tokens (mid-block, mid-tile)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(2, 5), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(t), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _runs(name, seed=0):
    (q, k, v, plan, do), real = inputs(name)
    seg = _segments(q.shape[0], q.shape[1], seed)
    kernel = lambda q, k, v: block_sparse_attention_triton(q, k, v, plan, return_lse=True, tiling=_TINY,
                                                           interpret=True, segment_ids=seg)
    ref = lambda q, k, v: block_sparse_attention_reference(q, k, v, plan, return_lse=True, segment_ids=seg)
    return (q, k, v, do), real, cotangent_run(kernel, q, k, v, do), cotangent_run(ref, q, k, v, do)


def _compare(got, want, real, tol=2e-5):
    for what, a, b in zip(NAMES, got, want):
        a, b = np.asarray(a, np.float32)[:, :real], np.asarray(b, np.float32)[:, :real]
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("name", ["tiny_g4_h64_w64", "tiny_g8_merge2_per_head", "tiny_no_local_nan"])
def test_forward_and_gradients_equal_the_reference(name):
    (q, k, v, _), real, kernel, ref = _runs(name)
    _compare(kernel(q, k, v), ref(q, k, v), real)


def test_nan_padding_tail_and_determinism():
    """bf16, G = 2, W = 128, a NaN padding group after the sequence (its own document): the real part equals
    the reference on the real tokens alone (causal: nothing real depends on the tail), stays finite, and two
    runs are bitwise equal."""
    (q, k, v, plan, do), real = inputs("bf16_g2_w128_nan_tail")
    seg = _segments(q.shape[0], real, 3)
    seg = jnp.concatenate([seg, jnp.full((q.shape[0], q.shape[1] - real), 99, jnp.int32)], axis=1)
    kernel = cotangent_run(lambda q, k, v: block_sparse_attention_triton(
        q, k, v, plan, return_lse=True, tiling=_TINY, interpret=True, segment_ids=seg), q, k, v, do)
    cut = lambda x: x[:, :real]
    head = dataclasses.replace(plan, kv_regions=plan.kv_regions[:, :, :real // plan.group_tokens])
    want = cotangent_run(lambda q, k, v: block_sparse_attention_reference(
        q, k, v, head, return_lse=True, segment_ids=cut(seg)), *map(cut, (q, k, v, do)))(*map(cut, (q, k, v)))
    got = kernel(q, k, v)
    for what, a, b in zip(NAMES, got, want):
        a, b = np.asarray(a, np.float32)[:, :real], np.asarray(b, np.float32)
        assert np.isfinite(a).all(), what
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * max(float(np.abs(b).max()), 1.0), err_msg=what)
    for a, b in zip(got, kernel(q, k, v)):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def test_one_document_equals_no_segments_and_the_dispatcher_takes_segments(monkeypatch):
    """A single document is the unsegmented kernel; ``block_sparse_attention`` with segment ids
    and ``implementation="pallas_triton"`` now runs the kernel (it declined before)."""
    (q, k, v, plan, _), _ = inputs("tiny_g4_h64_w64")
    one = jnp.zeros(q.shape[:2], jnp.int32)
    run = lambda seg: block_sparse_attention_triton(q, k, v, plan, tiling=_TINY, interpret=True,
                                                    segment_ids=seg)
    np.testing.assert_allclose(np.asarray(run(one)), np.asarray(run(None)), rtol=1e-6, atol=1e-6)
    seg = _segments(q.shape[0], q.shape[1], 5)
    from selmerge_jax.kernels.block_sparse_attention import pallas_triton

    def interpreted(q, k, v, plan, *, scale=None, return_lse=False, segment_ids=None):
        return block_sparse_attention_triton(q, k, v, plan, scale=scale, return_lse=return_lse, tiling=_TINY,
                                             interpret=True, segment_ids=segment_ids)

    monkeypatch.setattr(pallas_triton, "IMPLEMENTATION", interpreted)
    from selmerge_jax.kernels.block_sparse_attention import api

    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_triton", interpreted)
    got = block_sparse_attention(q, k, v, plan, segment_ids=seg, implementation="pallas_triton")
    want = block_sparse_attention_reference(q, k, v, plan, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="segment_ids"):
        block_sparse_attention_triton(q, k, v, plan, interpret=True, segment_ids=seg[:, 1:])


def test_native_segments_decline_when_switched_off(monkeypatch):
    from selmerge_jax.kernels.block_sparse_attention import pallas_triton

    monkeypatch.setattr(pallas_triton, "NATIVE_SEGMENTS", False)
    (q, k, v, plan, _), _ = inputs("tiny_g4_h64_w64")
    seg = _segments(q.shape[0], q.shape[1], 1)
    with pytest.raises(NotImplementedError, match=r"GPU|gpu|NATIVE_SEGMENTS"):
        block_sparse_attention_triton(q, k, v, plan, segment_ids=seg)


@pytest.mark.gpu
def test_native_gpu_segments_match_the_reference(monkeypatch):
    """The check that turns ``NATIVE_SEGMENTS`` on: the native build equals the reference (bf16)."""
    from selmerge_jax.kernels.block_sparse_attention import pallas_triton
    from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec

    monkeypatch.setattr(pallas_triton, "NATIVE_SEGMENTS", True)
    spec = AttentionSpec(name="gpu", seq_len=4096, q_heads=16, kv_heads=4, head_dim=128, block_size=128,
                         selected=8, per_kv_selection=True, ragged=0.2)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(5))
    seg = _segments(q.shape[0], q.shape[1], 7)
    native = cotangent_run(lambda q, k, v: block_sparse_attention_triton(
        q, k, v, plan, return_lse=True, segment_ids=seg), q, k, v, do)(q, k, v)
    want = cotangent_run(lambda q, k, v: block_sparse_attention_reference(
        q, k, v, plan, return_lse=True, segment_ids=seg), q, k, v, do)(q, k, v)
    for what, a, b in zip(NAMES, native, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * max(float(np.abs(b).max()), 1.0), err_msg=what)
