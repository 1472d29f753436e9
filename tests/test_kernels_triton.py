"""Pallas Triton block-sparse attention vs the pure-jnp reference (interpret mode on CPU, native on GPU).

Interpret-mode cost is almost all compilation (one while-loop program per kernel), so each test jits one
function returning the output, LSE and the three gradients, and tiles are kept tiny so the kernels still walk
several tiles and several loop trips per program.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.kernels.block_sparse_attention import (
    SelectionPlan,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from selmerge_jax.kernels.block_sparse_attention.pallas_triton import (
    TritonTiling,
    block_sparse_attention_triton,
)
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec, get_spec
from selmerge_jax.kernels.block_sparse_attention.transpose import compact_plan, stable_argsort, transpose_plan

_TINY = TritonTiling(rows_fwd=32, block_k_fwd=32, rows_dq=32, block_k_dq=16, rows_dkv=16, block_k_dkv=32)


def outputs(attn, q, k, v, do):
    """``(out, lse, dq, dk, dv)`` of ``attn``, with an LSE cotangent too (merging partials differentiates
    it)."""

    @jax.jit
    def run(q, k, v):
        (out, lse), vjp = jax.vjp(attn, q, k, v)
        dlse = jnp.where(jnp.isfinite(lse), 0.25, 0.0)
        return (out, lse, *vjp((do, dlse)))

    return run, run(q, k, v)


@functools.lru_cache(maxsize=8)
def reference_case(name: str, seed: int = 0):
    """Inputs and reference ``(out, lse, dq, dk, dv)`` of a named spec, shared by the Triton and TPU tests."""
    q, k, v, plan, do = get_spec(name).make_inputs(jax.random.PRNGKey(seed))
    return (q, k, v, plan, do), outputs(reference_fn(plan), q, k, v, do)[1]


def _kernel(plan, tiling=_TINY, interpret=True):
    return lambda q, k, v: block_sparse_attention_triton(q, k, v, plan, return_lse=True, tiling=tiling,
                                                         interpret=interpret)


def reference_fn(plan):
    return lambda q, k, v: block_sparse_attention_reference(q, k, v, plan, return_lse=True)


def assert_close(got, want, rtol, atol):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert not np.isnan(a).any(), f"{name} has NaN"
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("name", ["tiny_g4_h64_w64", "tiny_g1_h128_w128", "tiny_g8_merge2_per_head",
                                  "tiny_noncausal_g2"])
def test_matches_reference(name):
    """Forward, LSE, all gradients: G=4/1/8/2, H=64/128/32, W=64/128/32, merge 2, P=K and N, ragged,
    non-causal."""
    (q, k, v, plan, do), want = reference_case(name)
    run, got = outputs(_kernel(plan), q, k, v, do)
    assert_close(got, want, rtol=2e-5, atol=2e-5)
    if name == "tiny_g4_h64_w64":  # bitwise determinism: a second run of the same executable
        for a, b in zip(got, run(q, k, v)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


@functools.lru_cache(maxsize=1)
def empty_row_nan_case():
    """tiny_no_local with group 2 emptied and NaN K/V in every region no group selected (region 0 excepted).

    Returns the inputs and the reference outputs.
    """
    q, k, v, plan, do = get_spec("tiny_no_local").make_inputs(jax.random.PRNGKey(1))
    regions = plan.kv_regions.at[:, :, 2, :].set(-1)  # group 2 attends to nothing
    plan = SelectionPlan(regions, block_size=plan.block_size, merge=plan.merge, include_local=False)
    used = np.zeros(plan.num_regions, bool)
    used[np.asarray(regions)[np.asarray(plan.valid_mask())]] = True
    used[0] = True  # the reference gathers region 0 for padding entries (then masks it): keep it finite
    tok_bad = jnp.repeat(jnp.asarray(~used), plan.block_size)[None, :, None, None]
    k, v = jnp.where(tok_bad, jnp.nan, k), jnp.where(tok_bad, jnp.nan, v)
    return (q, k, v, plan, do), outputs(reference_fn(plan), q, k, v, do)[1]


def check_empty_row_and_nan(got, want, plan):
    lt = plan.group_tokens
    np.testing.assert_array_equal(np.asarray(got[0][:, 2 * lt:3 * lt]), 0.0)
    assert np.all(np.isneginf(np.asarray(got[1][:, 2 * lt:3 * lt])))
    assert_close(got, want, rtol=2e-5, atol=2e-5)  # dK/dV of the NaN regions are exactly 0 in both


def test_gradients_alone_reuse_the_output_buffer():
    """dQ is written into the forward output's buffer. With the output not returned (XLA keeps no copy) the
    gradients still equal the reference's; ``test_matches_reference`` returns both (XLA must copy first)."""
    (q, k, v, plan, do), _ = reference_case("tiny_g4_h64_w64")
    grads = lambda attn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)[0].astype(jnp.float32) * do),
                                          argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), grads(_kernel(plan)), grads(reference_fn(plan))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-5, atol=2e-5,
                                   err_msg=name)


def test_empty_row_and_nan_in_unselected_regions():
    """A group with no valid entry (include_local=False) outputs 0 / LSE -inf; NaN K/V nobody selected stays
    out."""
    (q, k, v, plan, do), want = empty_row_nan_case()
    _, got = outputs(_kernel(plan), q, k, v, do)
    check_empty_row_and_nan(got, want, plan)


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
    _, want = outputs(reference_fn(plan), q, k, v, do)
    run, got = outputs(_kernel(plan, TritonTiling(), interpret=False), q, k, v, do)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b)), name
    for a, b in zip(got, run(q, k, v)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_ms_attention_default_dispatch_picks_pallas_triton_on_gpu(monkeypatch):
    """``ms_attention(..., implementation=None)`` (and the layer's "pallas") reaches the Triton kernel on
    GPU."""
    from selmerge_jax.attention import MSAttentionConfig, ms_attention
    from selmerge_jax.kernels.block_sparse_attention import api

    calls = []

    def spy(q, k, v, plan, *, scale=None, return_lse=False):
        calls.append(plan.kv_regions.shape)
        return block_sparse_attention_reference(q, k, v, plan, scale=scale, return_lse=return_lse)

    api._load_backends()  # the real backend registers first; the spy then replaces it for this test only
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_triton", spy)
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    q = jax.random.normal(jax.random.PRNGKey(6), (1, 64, 4, 16))
    k = jax.random.normal(jax.random.PRNGKey(7), (1, 64, 2, 16))
    ms_attention(q, k, k, MSAttentionConfig(block_size=16, top_k=3, selection_heads="kv"))
    assert calls == [(1, 2, 4, 2)]


def test_random_plan_with_more_selected_than_regions_is_dense():
    from selmerge_jax.kernels.block_sparse_attention.specs import random_plan
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
