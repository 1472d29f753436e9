"""The device-side plan layouts the Pallas kernels read (``transpose.py``) and the spec plans
(``specs.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.kernels.block_sparse_attention import SelectionPlan
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec, random_plan
from selmerge_jax.kernels.block_sparse_attention.transpose import (
    compact_plan,
    stable_argsort,
    transpose_plan,
    transpose_plan_steps,
)


def numpy_plan(sel_heads=4, groups=16, selected=4, merge=1, seed=0) -> SelectionPlan:
    """A plan with random entries, -1 padding and some invalid (later / own-group) entries, built in numpy."""
    rng = np.random.default_rng(seed)
    shape = (1, sel_heads, groups, selected)
    regions = rng.random((*shape[:3], groups * merge)).argsort(-1)[..., :selected]  # distinct within a row
    regions = np.where(rng.random(shape) < 0.25, -1, regions)
    return SelectionPlan(jnp.asarray(regions, jnp.int32), block_size=16, merge=merge)


def test_transpose_plan_lists_every_reader():
    kv_heads = 2
    plan = numpy_plan(sel_heads=4)
    offsets, entries = map(np.asarray, transpose_plan(plan, kv_heads))
    regions, valid = np.asarray(plan.kv_regions), np.asarray(plan.valid_mask())
    per_kv = 4 // kv_heads
    for kh in range(kv_heads):
        for j in range(plan.num_regions):
            got = sorted(entries[0, kh, offsets[0, kh, j]:offsets[0, kh, j + 1]])
            want = sorted(s * plan.num_groups + g for s in range(per_kv) for g in range(plan.num_groups)
                          if (valid[0, kh * per_kv + s, g] & (regions[0, kh * per_kv + s, g] == j)).any())
            assert got == want, (kh, j)
    sel, cnt = map(np.asarray, compact_plan(plan))
    np.testing.assert_array_equal(cnt, valid.sum(-1))
    assert np.all(np.diff(sel, axis=-1) >= 0)


def test_step_list_visits_each_reader_once_in_region_order():
    """The Mosaic TPU dK/dV kernel's flat step list (``transpose_plan_steps``)."""
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


def test_random_plan_with_more_selected_than_regions_is_dense():
    spec = AttentionSpec(name="short", seq_len=64, q_heads=2, kv_heads=1, head_dim=8, block_size=16,
                         selected=8, dtype="float32")
    plan = random_plan(jax.random.PRNGKey(0), spec)
    assert plan.kv_regions.shape == (1, 1, 4, 8)
    np.testing.assert_array_equal(plan.valid_mask().sum(-1)[0, 0], [0, 1, 2, 3])


@pytest.mark.parametrize("bound", [37, 2**30])  # packed single-key sort, and the pair-sort fallback
def test_stable_argsort_matches_jnp(bound):
    keys = jax.random.randint(jax.random.PRNGKey(8), (3, 700), 0, 37)
    np.testing.assert_array_equal(np.asarray(stable_argsort(keys, bound)),
                                  np.asarray(jnp.argsort(keys, axis=-1, stable=True)))


def test_stable_argsort_rejects_a_bad_bound():
    with pytest.raises(ValueError, match="bound must be a positive int"):
        stable_argsort(jnp.zeros((4,), jnp.int32), 0)
