"""Mosaic TPU block-sparse attention vs the reference, in the Pallas interpreter (no TPU here), plus its
transposed-plan step list. Shares inputs and cached reference results with ``test_kernels_triton``."""

import jax
import numpy as np
import pytest
from test_kernels_triton import (
    assert_close,
    check_empty_row_and_nan,
    empty_row_nan_case,
    numpy_plan,
    outputs,
    reference_case,
    reference_fn,
)

from selmerge_jax.kernels.block_sparse_attention import block_sparse_attention
from selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_tpu import block_sparse_attention_mosaic_tpu
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec
from selmerge_jax.kernels.block_sparse_attention.transpose import transpose_plan_steps


def _kernel(plan, interpret=True):
    return lambda q, k, v: block_sparse_attention_mosaic_tpu(q, k, v, plan, return_lse=True,
                                                             interpret=interpret)


@pytest.mark.parametrize("name", ["tiny_g4_h64_w64", "tiny_g8_merge2_per_head", "tiny_noncausal_g2"])
def test_matches_reference(name):
    """Forward, LSE, dq/dk/dv: G=4 packed (P=K, W=64, ragged) and G=8 per-head (P=N, merge 2, W=32)."""
    (q, k, v, plan, do), want = reference_case(name)
    run, got = outputs(_kernel(plan), q, k, v, do)
    assert_close(got, want, rtol=2e-5, atol=2e-5)
    for a, b in zip(got, run(q, k, v)):  # bitwise determinism
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_empty_row_and_nan_in_unselected_regions():
    (q, k, v, plan, do), want = empty_row_nan_case()
    _, got = outputs(_kernel(plan), q, k, v, do)
    check_empty_row_and_nan(got, want, plan)


def test_step_list_visits_each_reader_once_in_region_order():
    kv_heads = 2
    plan = numpy_plan(sel_heads=4, groups=8, merge=2)
    region, group, sub, kind = map(np.asarray, transpose_plan_steps(plan, kv_heads))
    regions, valid = np.asarray(plan.kv_regions), np.asarray(plan.valid_mask())
    per_kv = 4 // kv_heads
    assert region.shape[-1] == per_kv * (plan.num_regions + plan.num_groups * plan.max_selected)
    for kh in range(kv_heads):
        assert np.all(np.diff(region[0,
                                     kh]) >= 0), "steps must be sorted by region (one output block at a time)"
        real = kind[0, kh] != 2
        assert np.all(~real[np.argmin(real):]) or real.all(), "padding steps come last"
        got = sorted((region[0, kh, e], sub[0, kh, e], group[0, kh, e])
                     for e in np.flatnonzero(kind[0, kh] == 0))
        want = sorted((regions[0, kh * per_kv + s, g, m], s, g) for s in range(per_kv)
                      for g in range(plan.num_groups) for m in range(plan.max_selected)
                      if valid[0, kh * per_kv + s, g, m])
        assert got == want
        local = sorted((region[0, kh, e], sub[0, kh, e], group[0, kh, e])
                       for e in np.flatnonzero(kind[0, kh] == 1))
        assert local == sorted((j, s, j // plan.merge) for j in range(plan.num_regions)
                               for s in range(per_kv))


def test_dispatch_declines_off_tpu():
    (q, k, v, plan, _), want = reference_case("tiny_g4_h64_w64")
    if jax.default_backend() != "tpu":
        with pytest.raises(NotImplementedError, match="pallas_mosaic_tpu"):
            block_sparse_attention(q, k, v, plan, implementation="pallas_mosaic_tpu")
    out = block_sparse_attention(q, k, v, plan, implementation=("pallas_mosaic_tpu", "xla"))
    np.testing.assert_allclose(out, want[0], rtol=2e-5, atol=2e-5)


@pytest.mark.tpu
def test_native_tpu_bf16_matches_reference():
    spec = AttentionSpec(name="tpu", seq_len=4096, q_heads=16, kv_heads=4, head_dim=128, block_size=128,
                         selected=8, ragged=0.2)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(5))
    _, want = outputs(reference_fn(plan), q, k, v, do)
    _, got = outputs(_kernel(plan, interpret=False), q, k, v, do)
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))
