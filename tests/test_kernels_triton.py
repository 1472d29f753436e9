"""Pallas Triton block-sparse attention vs the pure-jnp reference (interpret mode on CPU, native on GPU).

Interpret-mode cost is almost all compilation (one while-loop program per kernel), so each test jits one
function returning the output, LSE and the three gradients, and tiles are kept tiny so the kernels still walk
several tiles and several loop trips per program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.kernels.block_sparse_attention import (
    SelectionPlan,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from selmerge_jax.kernels.block_sparse_attention.pallas_triton import TritonTiling, block_sparse_attention_triton
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec, get_spec
from selmerge_jax.kernels.block_sparse_attention.transpose import compact_plan, transpose_plan

_TINY = TritonTiling(rows_fwd=32, block_k_fwd=32, rows_dq=32, block_k_dq=16, rows_dkv=16, block_k_dkv=32)


def _outputs(attn, q, k, v, do):
    """``(out, lse, dq, dk, dv)`` of ``attn``, with an LSE cotangent too (merging partials differentiates it)."""

    @jax.jit
    def run(q, k, v):
        (out, lse), vjp = jax.vjp(attn, q, k, v)
        dlse = jnp.where(jnp.isfinite(lse), 0.25, 0.0)
        return (out, lse, *vjp((do, dlse)))

    return run, run(q, k, v)


def _kernel(plan, tiling=_TINY, interpret=True):
    return lambda q, k, v: block_sparse_attention_triton(q, k, v, plan, return_lse=True, tiling=tiling,
                                                         interpret=interpret)


def _reference(plan):
    return lambda q, k, v: block_sparse_attention_reference(q, k, v, plan, return_lse=True)


def _assert_close(got, want, rtol, atol):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert not np.isnan(a).any(), f"{name} has NaN"
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("name", ["tiny_g4_h64_w64", "tiny_g1_h128_w128", "tiny_g8_merge2_per_head"])
def test_matches_reference(name):
    """Forward, LSE and all gradients: GQA G=4/1/8, H=64/128, W=64/128/32, merge 2, P=K and P=N, ragged."""
    q, k, v, plan, do = get_spec(name).make_inputs(jax.random.PRNGKey(0))
    _, want = _outputs(_reference(plan), q, k, v, do)
    run, got = _outputs(_kernel(plan), q, k, v, do)
    _assert_close(got, want, rtol=2e-5, atol=2e-5)
    if name == "tiny_g4_h64_w64":  # bitwise determinism: a second run of the same executable
        for a, b in zip(got, run(q, k, v)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_empty_row_and_nan_in_unselected_regions():
    """A group with no valid entry (include_local=False) outputs 0 / LSE -inf; NaN K/V nobody selected stays out."""
    spec = get_spec("tiny_no_local")
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(1))
    regions = plan.kv_regions.at[:, :, 2, :].set(-1)  # group 2 attends to nothing
    plan = SelectionPlan(regions, block_size=plan.block_size, merge=plan.merge, include_local=False)
    used = np.zeros(plan.num_regions, bool)
    used[np.asarray(regions)[np.asarray(plan.valid_mask())]] = True
    used[0] = True  # the reference gathers region 0 for padding entries (then masks it): keep it finite
    tok_bad = jnp.repeat(jnp.asarray(~used), plan.block_size)[None, :, None, None]
    k, v = jnp.where(tok_bad, jnp.nan, k), jnp.where(tok_bad, jnp.nan, v)
    _, want = _outputs(_reference(plan), q, k, v, do)
    _, got = _outputs(_kernel(plan), q, k, v, do)
    lt = plan.group_tokens
    np.testing.assert_array_equal(np.asarray(got[0][:, 2 * lt:3 * lt]), 0.0)
    assert np.all(np.isneginf(np.asarray(got[1][:, 2 * lt:3 * lt])))
    _assert_close(got, want, rtol=2e-5, atol=2e-5)  # dK/dV of the NaN regions are exactly 0 in both


def test_transpose_plan_lists_every_reader():
    spec = AttentionSpec(name="t", seq_len=256, q_heads=4, kv_heads=2, head_dim=16, block_size=16, selected=4,
                         per_kv_selection=False, ragged=0.3)
    plan = spec.make_inputs(jax.random.PRNGKey(2))[3]
    offsets, entries = map(np.asarray, transpose_plan(plan, spec.kv_heads))
    regions, valid = np.asarray(plan.kv_regions), np.asarray(plan.valid_mask())
    per_kv = spec.sel_heads // spec.kv_heads
    for kh in range(spec.kv_heads):
        for j in range(plan.num_regions):
            got = sorted(entries[0, kh, offsets[0, kh, j]:offsets[0, kh, j + 1]])
            want = sorted(s * plan.num_groups + g for s in range(per_kv) for g in range(plan.num_groups)
                          if (valid[0, kh * per_kv + s, g] & (regions[0, kh * per_kv + s, g] == j)).any())
            assert got == want, (kh, j)
    sel, cnt = map(np.asarray, compact_plan(plan))
    np.testing.assert_array_equal(cnt, valid.sum(-1))
    assert np.all(np.diff(sel, axis=-1) >= 0)


def test_dispatch_declines_on_cpu_and_falls_back():
    q, k, v, plan, _ = get_spec("tiny_g4_h64_w64").make_inputs(jax.random.PRNGKey(3))
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="pallas_triton"):
            block_sparse_attention(q, k, v, plan, implementation="pallas_triton")
    out = block_sparse_attention(q, k, v, plan, implementation=("pallas_triton", "xla"))
    np.testing.assert_allclose(out, block_sparse_attention_reference(q, k, v, plan), rtol=2e-5, atol=2e-5)


def test_rejects_what_it_cannot_tile():
    q, k, v, plan, _ = get_spec("tiny_g4_h64_w64").make_inputs(jax.random.PRNGKey(4))
    with pytest.raises(NotImplementedError, match="head dim"):
        block_sparse_attention_triton(q[..., :48], k[..., :48], v[..., :48], plan, interpret=True)
    with pytest.raises(NotImplementedError, match="dtype"):
        block_sparse_attention_triton(*(x.astype(jnp.int32) for x in (q, k, v)), plan, interpret=True)
    with pytest.raises(ValueError, match="rows_fwd"):
        TritonTiling(rows_fwd=48)


@pytest.mark.gpu
@pytest.mark.parametrize("per_kv", [True, False])
def test_native_gpu_bf16_matches_reference(per_kv):
    spec = AttentionSpec(name="gpu", seq_len=4096, q_heads=16, kv_heads=4, head_dim=128, block_size=128,
                         selected=8, per_kv_selection=per_kv, ragged=0.2)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(5))
    _, want = _outputs(_reference(plan), q, k, v, do)
    run, got = _outputs(_kernel(plan, TritonTiling(), interpret=False), q, k, v, do)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b)), name
    for a, b in zip(got, run(q, k, v)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
