"""Pallas Mosaic GPU (Hopper) block-sparse kernels (forward, dQ and dK/dV passes) vs the pure-jnp reference.

On CPU: the shared cases (``kernel_test_base``) in the Mosaic GPU interpreter, which runs the real TMA/barrier
protocol, plan and transposed-plan indexing, item scheduling, masking and softmax (only the matmuls are plain
dots there), and what the kernel declines (so ``api`` dispatch falls through). Native runs are marked ``gpu``
(an H100/H200; run with ``JAX_PLATFORMS=cuda``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from kernel_test_base import Backend, BackendCases, assert_close, cotangent_run, reference_attention

from selmerge_jax.kernels.block_sparse_attention import SelectionPlan
from selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu import (
    MosaicTiling,
    block_sparse_attention_mosaic_gpu,
    make_static,
)
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec

# The interpreter's time grows with the CTAs it simulates (several seconds each): one CTA where the multi-CTA
# schedule is not the point, two on the problem whose dK/dV snake order ends in a partial round.
_ONE_CTA = MosaicTiling(interpret_ctas=1)
_TILINGS = {"bf16_g2_w128_nan_tail": MosaicTiling(interpret_ctas=2)}


def _shared_case(problem, plan):
    tiling = _TILINGS.get(problem, _ONE_CTA)
    return lambda q, k, v: block_sparse_attention_mosaic_gpu(q, k, v, plan, return_lse=True, tiling=tiling,
                                                             interpret=True)


class TestMosaicGpuCases(BackendCases):
    backend = Backend(
        name="pallas_mosaic_gpu",
        attention=_shared_case,
        native=block_sparse_attention_mosaic_gpu,
        # The first reason the kernel names: P == K is checked before the dtype.
        declines={"tiny_g4_h64_w64": "dtype", "tiny_g1_h128_w128": "dtype",
                  "tiny_g8_merge2_per_head": "per kv head", "tiny_noncausal_g2": "dtype",
                  "tiny_no_local_nan": "dtype", "tiny_g16_h256_b2_ragged": "dtype"},
        on_platform=lambda: jax.default_backend() == "gpu",
    )


def _spec(g=2, w=64, h=64, t=256, kv_heads=2, **kw):
    kw = {"selected": 2, "dtype": "bfloat16", "ragged": 0.3, **kw}
    return AttentionSpec(name="mgpu", seq_len=t, q_heads=kv_heads * g, kv_heads=kv_heads, head_dim=h,
                         block_size=w, **kw)


def _outputs(attn, q, k, v, do):
    """``(run, (out, lse, dq, dk, dv))``, with an LSE cotangent too (the backward must take it)."""
    run = cotangent_run(attn, q, k, v, do)
    return run, run(q, k, v)


def _mosaic(plan, **kw):
    return lambda q, k, v: block_sparse_attention_mosaic_gpu(q, k, v, plan, return_lse=True, **kw)


def _changed_fields(tiling: MosaicTiling) -> str:
    """A test id: the fields that differ from the default tiling."""
    default = MosaicTiling()
    return ",".join(f"{k}={v}" for k, v in vars(tiling).items() if getattr(default, k) != v) or "default"


def _assert_interpreted_forward(plan, tiling, q, k, v):
    """The forward (outputs, LSE) in the Mosaic GPU interpreter against the reference."""
    out, lse = jax.jit(_mosaic(plan, interpret=True, tiling=tiling))(q, k, v)
    want_out, want_lse = reference_attention(plan)(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), atol=2e-2)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize(("change", "match"), [
    ({"dtype": "float32"}, "dtype"),
    ({"h": 32}, "head dim"),
    ({"h": 256}, "head dim"),
    ({"w": 32}, "block_size"),
    ({"merge": 2}, "merge"),
    ({"per_kv_selection": False}, "per kv head"),
    ({"causal": False}, "causal"),
    ({"include_local": False}, "include_local"),
])
def test_rejects_unsupported_inputs(change, match):
    """Everything outside the H100 spec's family raises NotImplementedError (checked before any lowering)."""
    g, w, h, t = 2, change.get("w", 64), change.get("h", 64), 256
    dtype = jnp.float32 if change.get("dtype") else jnp.bfloat16
    q = jnp.zeros((1, t, 2 * g, h), dtype)
    k = jnp.zeros((1, t, 2, h), dtype)
    merge = change.get("merge", 1)
    heads = 2 * g if change.get("per_kv_selection") is False else 2
    regions = jnp.full((1, heads, t // (w * merge), 2), -1, jnp.int32)
    plan = SelectionPlan(regions, block_size=w, merge=merge, causal=change.get("causal", True),
                         include_local=change.get("include_local", True))
    with pytest.raises(NotImplementedError, match=match):
        block_sparse_attention_mosaic_gpu(q, k, k, plan, interpret=True)


def test_tiling_validation():
    with pytest.raises(ValueError, match="stages"):
        MosaicTiling(stages=1)
    with pytest.raises(TypeError, match="pingpong"):
        MosaicTiling(pingpong=1)
    with pytest.raises(ValueError, match="compute_registers"):
        MosaicTiling(compute_registers=230)
    with pytest.raises(ValueError, match=r"compute_registers must be a multiple of 8 in \[168, 240\]"):
        MosaicTiling(compute_registers=248)  # the producer would keep fewer than 24: setmaxnreg would hang
    with pytest.raises(ValueError, match="compute_registers"):
        MosaicTiling(compute_registers=160)  # below the launch's 168: setmaxnreg.inc is undefined there
    # two compute warpgroups and the producer share 504 registers a thread (168 x 384 threads)
    assert MosaicTiling().producer_registers == 24  # FA3's split, 240 + 240 + 24
    assert MosaicTiling(compute_registers=232).producer_registers == 40
    with pytest.raises(ValueError, match="cluster"):
        MosaicTiling(cluster=3)
    with pytest.raises(ValueError, match="cluster"):
        MosaicTiling(cluster=True)
    with pytest.raises(ValueError, match="compute_registers"):
        MosaicTiling(compute_registers=232.0)
    with pytest.raises(ValueError, match="backward"):
        MosaicTiling(backward="xla")
    with pytest.raises(ValueError, match="stages_dkv"):
        MosaicTiling(stages_dkv=7)
    with pytest.raises(ValueError, match="stages_dq"):
        MosaicTiling(stages_dq=True)
    with pytest.raises(TypeError, match="pingpong_dq"):
        MosaicTiling(pingpong_dq="yes")
    with pytest.raises(TypeError, match="overlap"):
        MosaicTiling(overlap=1)
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match="interpret_ctas"):
            MosaicTiling(interpret_ctas=bad)
    with pytest.raises(ValueError, match="dq_slots must be an int in"):
        MosaicTiling(dq_slots=0)
    for staging in ({"dq_slots": 2}, {"dq_swizzle": True}):  # they shape the fused dQ's staging only
        with pytest.raises(ValueError, match="need fused_dq=True"):
            MosaicTiling(**staging)
    with pytest.raises(TypeError, match="overlap_dq"):
        MosaicTiling(overlap_dq=0)
    with pytest.raises(TypeError, match="delta_in_dq"):
        MosaicTiling(delta_in_dq="yes")
    for change in ({"fused_dq": True}, {"backward": "triton"}):  # no Mosaic dQ pass runs there
        for name in ("overlap_dq", "delta_in_dq"):
            with pytest.raises(ValueError, match=f"{name}=True shapes the Mosaic dQ pass"):
                MosaicTiling(**change, **{name: True})
        with pytest.raises(ValueError, match="cluster_dq=2 shapes the Mosaic dQ pass"):
            MosaicTiling(**change, cluster_dq=2)
    for bad in (3, True, 2.0):
        with pytest.raises(ValueError, match=r"cluster_dq must be None \(by length\), 1, 2 or 4, got"):
            MosaicTiling(cluster_dq=bad)
    with pytest.raises(ValueError, match="overlap_dq=True and pingpong_dq=True"):
        MosaicTiling(overlap_dq=True, pingpong_dq=True)
    with pytest.raises(ValueError, match="dq_exchange=True needs fused_dq=True"):
        MosaicTiling(dq_exchange=True)
    with pytest.raises(ValueError, match="fused_dq=True needs backward='mosaic'"):
        MosaicTiling(fused_dq=True, backward="triton")


def test_declines_inside_shard_map():
    """Ring attention calls the op inside shard_map; Mosaic leaves that to Triton (falls through)."""
    q, k, v, plan, _ = _spec().make_inputs(jax.random.PRNGKey(6))
    mesh = jax.make_mesh((2,), ("r",))
    spec = P("r")  # batch-sharded: each shard is a whole problem
    q, k, v = (jax.device_put(jnp.concatenate([x, x]), NamedSharding(mesh, spec)) for x in (q, k, v))
    regions = jax.device_put(jnp.concatenate([plan.kv_regions] * 2), NamedSharding(mesh, spec))
    seen = []

    def local(q, k, v, regions):
        shard_plan = SelectionPlan(regions, block_size=plan.block_size, merge=1)
        try:
            block_sparse_attention_mosaic_gpu(q, k, v, shard_plan, interpret=True)
        except NotImplementedError as e:
            seen.append(str(e))
        return q

    jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)(q, k, v, regions)
    assert seen and "shard_map" in seen[0]


@pytest.mark.slow  # ~15-35 s each on one core: the interpreter simulates every warpgroup, barrier and copy
@pytest.mark.parametrize("tiling", [MosaicTiling(stages=3, persistent=False), MosaicTiling()])
def test_interpret_forward_matches_reference(tiling):
    """Two compute warpgroups ping-ponging (G=2) over ragged rows and an all-padding row (local block only),
    in the Mosaic GPU interpreter; one CTA per item with a 3-stage ring, or 3 persistent CTAs looping over
    items (the K/V ring and the Q double buffer carried across items)."""
    q, k, v, plan, _ = _spec(g=2, t=256).make_inputs(jax.random.PRNGKey(3))
    plan = SelectionPlan(plan.kv_regions.at[:, 0, 3].set(-1), block_size=plan.block_size, merge=1)
    _assert_interpreted_forward(plan, tiling, q, k, v)


@pytest.mark.parametrize(("g", "w", "t", "tiling"), [
    (2, 64, 256, MosaicTiling(pingpong=True, interpret_ctas=2)),
    (1, 128, 512, MosaicTiling(pingpong=True, interpret_ctas=1)),
    (2, 64, 256, MosaicTiling(overlap=False, interpret_ctas=2)),
    (1, 128, 512, MosaicTiling(overlap=False, interpret_ctas=1)),
])
def test_interpret_forward_variants_match_reference(g, w, t, tiling):
    """The forwards other than the default (overlapped, warpgroups free-running; the shared cases above run
    it): overlapped with the warpgroups taking turns (a barrier each), and the plain step loop with the
    rendezvous ping-pong. Outputs and LSE against the reference in the interpreter, which runs the K/V ring's
    and the turn or rendezvous barriers' protocol: two warpgroups over two heads with two persistent CTAs, and
    the two chunks of one head (odd G); rows with padding, and group 0 (nothing to select: its local block is
    step 0)."""
    q, k, v, plan, _ = _spec(g=g, w=w, t=t).make_inputs(jax.random.PRNGKey(3))
    plan = SelectionPlan(plan.kv_regions.at[:, 0, 1].set(-1), block_size=w, merge=1)
    _assert_interpreted_forward(plan, tiling, q, k, v)


@pytest.mark.parametrize("g, cluster, want", [(4, 2, 2), (4, 4, 4), (2, 4, 2), (1, 4, 1)])
def test_clusters_hold_items_of_one_plan_row(g, cluster, want):
    """``cluster`` (forward) and ``cluster_dq`` (dQ pass) are capped at the largest power of two dividing
    the items per plan row (``subs``: 128-token regions give 2 chunks x G heads / 2 warpgroups, so one item a
    row at G = 1, where the warpgroups pair the chunks), and the persistent CTAs come in whole clusters."""
    from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu_bwd as bwd

    q, k, _, plan, _ = _spec(g=g, w=128, t=512).make_inputs(jax.random.PRNGKey(3))
    tiling = MosaicTiling(cluster=cluster, cluster_dq=cluster, interpret_ctas=5)
    st = make_static(q, k, plan, None, tiling, interpret=True)
    dq = bwd._dq_static(st)
    assert st.items % st.subs == 0 and st.subs % want == 0
    for s in (st, dq):
        assert s.cluster == want and s.ctas == 5 // want * want
    assert dq.tiling.cluster == cluster and dq.tiling.stages == tiling.stages_dq
    plain = bwd._dq_static(make_static(q, k, plan, None, MosaicTiling(cluster=cluster, cluster_dq=1,
                                                                      interpret_ctas=5), interpret=True))
    assert plain.cluster == 1 and plain.ctas == 5


@pytest.mark.parametrize("t, interpret, want", [(512, False, 1), (65536, False, 1), (131072, True, 1),
                                                (131072, False, 2), (1048576, False, 2)])
def test_clusters_by_default_from_128k_tokens_on_a_gpu(t, interpret, want):
    """``cluster=None`` / ``cluster_dq=None`` (the default): 2-CTA clusters from 128K tokens up on a GPU
    (measured faster at 1M, slower at 64K), never in the interpreter (it has no cluster barriers); the
    statics only read shapes, so the long case needs no memory."""
    from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu_bwd as bwd

    w, kvh, g = 128, 2, 4
    q = jax.ShapeDtypeStruct((1, t, kvh * g, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, t, kvh, 64), jnp.bfloat16)
    plan = SelectionPlan(jnp.zeros((1, kvh, t // w, 2), jnp.int32), block_size=w, merge=1)
    st = make_static(q, k, plan, None, MosaicTiling(), interpret=interpret)
    assert st.cluster == want and bwd._dq_static(st).cluster == want and st.ctas % want == 0
    explicit = make_static(q, k, plan, None, MosaicTiling(cluster=1, cluster_dq=4), interpret=interpret)
    assert explicit.cluster == 1 and bwd._dq_static(explicit).cluster == 4


@pytest.mark.parametrize("g", [1, 3])
def test_odd_groups_pair_chunks_in_the_interpreter(g):
    """Odd G with 128-token regions: the forward's and the dQ pass's two compute warpgroups take the two
    64-token chunks of one head (each masking the local block for its own chunk); outputs, LSE and the three
    gradients against the reference, over ragged rows, two kv heads (the head offset) and a group that
    attends only to its local block."""
    q, k, v, plan, do = _spec(g=g, w=128, t=512, kv_heads=2).make_inputs(jax.random.PRNGKey(12))
    plan = SelectionPlan(plan.kv_regions.at[:, 1, 2].set(-1), block_size=128, merge=1)
    assert make_static(q, k, plan, None, MosaicTiling(), interpret=True).pair_chunks
    assert not make_static(q, k, plan, None, MosaicTiling(pair_chunks=False), interpret=True).pair_chunks
    _, want = _outputs(reference_attention(plan), q, k, v, do)
    _, got = _outputs(_mosaic(plan, interpret=True, tiling=_ONE_CTA), q, k, v, do)
    assert_close(got, want, rel=2e-2)


@pytest.mark.parametrize("change", [{"overlap_dq": True}, {"delta_in_dq": True}])
@pytest.mark.parametrize(("g", "w", "t"), [(2, 64, 256), (1, 128, 512)])
def test_dq_pass_variants_in_the_interpreter(change, g, w, t):
    """``overlap_dq=True``: each dQ product deferred a step, the first chunk's local step over 64 keys;
    ``delta_in_dq=True``: the dQ pass computes rowsum(dO O) itself (LSE cotangent included) and writes the
    stats the dK/dV pass reads. Against the reference, and all outputs bitwise equal to the plain passes'
    (the interpreter's products are plain dots, added in the same order; the skipped keys are masked there):
    two warpgroups over two heads (W = 64: no half-width step) and over the two chunks of one head (W = 128),
    two persistent CTAs, padded rows and a group with nothing selected (its local region is step 0)."""
    q, k, v, plan, do = _spec(g=g, w=w, t=t).make_inputs(jax.random.PRNGKey(3))
    plan = SelectionPlan(plan.kv_regions.at[:, 0, 1].set(-1), block_size=w, merge=1)
    _, want = _outputs(reference_attention(plan), q, k, v, do)
    _, got = _outputs(_mosaic(plan, interpret=True, tiling=MosaicTiling(**change, interpret_ctas=2)),
                      q, k, v, do)
    assert_close(got, want, rel=2e-2)
    _, plain = _outputs(_mosaic(plan, interpret=True, tiling=MosaicTiling(interpret_ctas=2)), q, k, v, do)
    for a, b in zip(got, plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("field", "depth", "fused"), [("stages_dkv", 6, False), ("stages_dq", 4, False),
                                                       ("stages", 4, False), ("stages_fused", 4, True)])
def test_ring_depth_beyond_shared_memory_names_the_setting(field, depth, fused):
    """W = H = 128: these rings cannot fit in 227 KiB; the error names the field (the compiler's would
    not). The fused dQ's exchange and staging leave room for three Q/dO stages, not four."""
    q, k, _, plan, _ = _spec(g=2, w=128, h=128, t=512).make_inputs(jax.random.PRNGKey(10))
    with pytest.raises(ValueError, match=f"MosaicTiling.{field}={depth}"):
        make_static(q, k, plan, None, MosaicTiling(**{field: depth}, fused_dq=fused), interpret=False)
    make_static(q, k, plan, None, MosaicTiling(fused_dq=fused), interpret=False)  # the default depths fit


def test_fused_staging_beyond_shared_memory_names_dq_slots():
    """W = H = 128: two f32 staging tiles per warpgroup fit beside a Q/dO ring of depth 2, not 3."""
    q, k, _, plan, _ = _spec(g=2, w=128, h=128, t=512).make_inputs(jax.random.PRNGKey(10))
    with pytest.raises(ValueError, match=r"stages_fused=3 \(with dq_slots=2\).*or fewer dq_slots"):
        make_static(q, k, plan, None, MosaicTiling(fused_dq=True, dq_slots=2), interpret=False)
    make_static(q, k, plan, None, MosaicTiling(fused_dq=True, dq_slots=2, stages_fused=2), interpret=False)


@pytest.mark.parametrize(("g", "h", "exchange", "slots", "swizzle"),
                         [(3, 64, False, 1, False), (4, 128, True, 2, True)])
def test_fused_dq_in_the_interpreter(g, h, exchange, slots, swizzle):
    """``fused_dq=True``: dQ added inside the dK/dV pass (each warpgroup over the whole head dim, or, at
    H = 128 so that both warpgroups own columns, exchanging dS^T and adding half of it), against the
    reference; two CTAs (the private per-CTA dQ slices the interpreter sums), ragged rows, odd G (the
    non-exchanging warpgroup 1 skips its hidden steps), even G with the exchange (no step skipped). The
    interpreter reads, adds and writes back where a GPU reduce-adds by TMA: that path, its staging tiles
    (``dq_slots``, ``dq_swizzle``: here only their indexing and layout) and the proxy fences run in the
    gpu-marked tests only. The slow test below holds the same cases to the default's two passes."""
    q, k, v, plan, do = _spec(g=g, h=h, w=128, t=512, kv_heads=2).make_inputs(jax.random.PRNGKey(13))
    _, want = _outputs(reference_attention(plan), q, k, v, do)
    tiling = MosaicTiling(interpret_ctas=2, fused_dq=True, dq_exchange=exchange, dq_slots=slots,
                          dq_swizzle=swizzle)
    _, got = _outputs(_mosaic(plan, interpret=True, tiling=tiling), q, k, v, do)
    assert_close(got, want, rel=2e-2)


@pytest.mark.slow  # 60-80 s a case on a 2-core CPU: the interpreter runs both backwards
@pytest.mark.parametrize(("g", "h", "exchange", "slots", "swizzle"),
                         [(3, 64, False, 1, False), (4, 128, True, 2, True)])
def test_fused_dq_equals_the_two_passes_in_the_interpreter(g, h, exchange, slots, swizzle):
    """The cases above against the default's two passes, tighter than against the reference: the forward is
    the same kernel (bitwise); the gradients differ only by the order of their f32 sums (dQ's, and dK/dV's
    readers visited from a rotated start). On a GPU ``test_native_tilings_agree`` compares the two (atol
    1e-2)."""
    q, k, v, plan, do = _spec(g=g, h=h, w=128, t=512, kv_heads=2).make_inputs(jax.random.PRNGKey(13))
    fused = MosaicTiling(interpret_ctas=2, fused_dq=True, dq_exchange=exchange, dq_slots=slots,
                         dq_swizzle=swizzle)
    _, got = _outputs(_mosaic(plan, interpret=True, tiling=fused), q, k, v, do)
    _, two = _outputs(_mosaic(plan, interpret=True, tiling=MosaicTiling(interpret_ctas=2)), q, k, v, do)
    for a, b in zip(got[:2], two[:2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_close(got[2:], two[2:], rel=5e-3, names=("dq", "dk", "dv"))


def test_declines_a_plan_without_slots():
    """M = 0 (only the local block): declined, so dispatch falls through, instead of reading slot -1."""
    q, k, v, plan, _ = _spec(g=2, w=64, t=256).make_inputs(jax.random.PRNGKey(11))
    empty = SelectionPlan(jnp.zeros((*plan.kv_regions.shape[:3], 0), jnp.int32), block_size=64, merge=1)
    with pytest.raises(NotImplementedError, match="M=0"):
        block_sparse_attention_mosaic_gpu(q, k, v, empty, interpret=True)


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("g", "w", "h", "dtype"), [(1, 64, 64, "bfloat16"), (4, 128, 128, "bfloat16"),
                                                      (8, 128, 64, "float16"), (1, 128, 128, "bfloat16"),
                                                      (3, 128, 64, "bfloat16")])
@pytest.mark.parametrize("tiling", [MosaicTiling(fused_dq=True), MosaicTiling(overlap_dq=False),
                                    MosaicTiling(overlap_dq=True), MosaicTiling(delta_in_dq=True)],
                         ids=["fused", "dq_pass", "overlap_dq", "delta_in_dq"])
def test_native_matches_reference(g, w, h, dtype, tiling):
    """Forward, LSE and the three gradients (dQ fused into the dK/dV pass, or the separate dQ pass, plain,
    with its dQ products deferred, or computing delta itself); G = 1/3/4/8 (odd G at W = 128: the
    chunk-paired warpgroups), ragged plans, rows with no valid entry. With the dQ pass, bitwise deterministic
    across runs; fused, dQ's f32 additions come in any order, so a second run agrees to rounding."""
    fused = tiling.fused_dq
    spec = AttentionSpec(name="mgpu", seq_len=4096, q_heads=2 * g, kv_heads=2, head_dim=h, block_size=w,
                         selected=8, dtype=dtype, ragged=0.3)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(4))
    plan = SelectionPlan(plan.kv_regions.at[:, :, 5].set(-1), block_size=w, merge=1)  # group 5: local only
    _, want = _outputs(reference_attention(plan), q, k, v, do)
    run, got = _outputs(_mosaic(plan, tiling=tiling), q, k, v, do)
    assert_close(got, want, rel=2e-2)
    again = run(q, k, v)
    if fused:  # the forward is bitwise; the gradients' f32 sums may run in another order
        for a, b in zip(got[:2], again[:2]):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert_close(again[2:], got[2:], rel=5e-3, names=("dq", "dk", "dv"))
    else:
        for a, b in zip(got, again):
            assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@pytest.mark.parametrize(("g", "w", "h", "dtype"), [(1, 64, 64, "bfloat16"), (4, 128, 128, "bfloat16"),
                                                      (8, 128, 64, "float16"), (1, 128, 128, "bfloat16"),
                                                      (3, 128, 64, "bfloat16")])
@pytest.mark.parametrize("tiling", [MosaicTiling(pingpong=True), MosaicTiling(overlap=False)])
def test_native_forward_variants_match_reference(g, w, h, dtype, tiling):
    """The forwards other than the default on the GPU (overlapped with turns; the plain step loop with the
    rendezvous ping-pong): outputs and LSE against the reference over the shapes of
    ``test_native_matches_reference`` (one warpgroup, two over heads, two over chunks), ragged plans and a
    local-only group, and bitwise the same on a second run."""
    spec = AttentionSpec(name="mgpu", seq_len=4096, q_heads=2 * g, kv_heads=2, head_dim=h, block_size=w,
                         selected=8, dtype=dtype, ragged=0.3)
    q, k, v, plan, _ = spec.make_inputs(jax.random.PRNGKey(4))
    plan = SelectionPlan(plan.kv_regions.at[:, :, 5].set(-1), block_size=w, merge=1)  # group 5: local only
    run = jax.jit(_mosaic(plan, tiling=tiling))
    got, again = run(q, k, v), run(q, k, v)
    assert_close(got, reference_attention(plan)(q, k, v), rel=2e-2, names=("out", "lse"))
    for a, b in zip(got, again):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", [MosaicTiling(persistent=False), MosaicTiling(overlap=False),
                                    MosaicTiling(overlap=False, pingpong=False), MosaicTiling(pingpong=True),
                                    MosaicTiling(cluster=2), MosaicTiling(cluster_dq=2),
                                    MosaicTiling(cluster=2, cluster_dq=2, delta_in_dq=True),
                                    MosaicTiling(backward="triton"),
                                    MosaicTiling(pingpong_dq=True, stages_dkv=3),
                                    MosaicTiling(overlap_dq=True), MosaicTiling(delta_in_dq=True),
                                    MosaicTiling(fused_dq=True),
                                    MosaicTiling(fused_dq=True, dq_exchange=True),
                                    MosaicTiling(fused_dq=True, stages_fused=2),
                                    MosaicTiling(fused_dq=True, dq_exchange=True, stages_fused=2, dq_slots=2,
                                                 dq_swizzle=True),
                                    MosaicTiling(compute_registers=232)], ids=_changed_fields)
def test_native_tilings_agree(tiling):
    """Other launch configurations (dQ fused into the dK/dV pass, the Triton backward) give the default's
    outputs and gradients."""
    spec = AttentionSpec(name="mgpu", seq_len=2048, q_heads=8, kv_heads=2, head_dim=128, block_size=128,
                         selected=4, ragged=0.2)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(5))
    _, got = _outputs(_mosaic(plan, tiling=tiling), q, k, v, do)
    _, want = _outputs(_mosaic(plan), q, k, v, do)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=1e-2)


@pytest.mark.gpu
def test_fused_dq_staging_slots_across_skipped_steps():
    """Odd G without the exchange: warpgroup 1 skips the own group's first steps, which add no dQ. The
    staging tiles are counted per reduce-add, not per step, so with ``dq_slots=2`` at H = 64 (G x H / 64 =
    3 tiles a group) a tile is never rewritten while its reduce-add may still read it."""
    spec = AttentionSpec(name="mgpu", seq_len=2048, q_heads=6, kv_heads=2, head_dim=64, block_size=128,
                         selected=4, ragged=0.2)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(6))
    _, want = _outputs(reference_attention(plan), q, k, v, do)
    _, got = _outputs(_mosaic(plan, tiling=MosaicTiling(fused_dq=True, dq_slots=2)), q, k, v, do)
    assert_close(got, want, rel=2e-2)
    _, two = _outputs(_mosaic(plan), q, k, v, do)
    assert_close(got[2:], two[2:], rel=5e-3, names=("dq", "dk", "dv"))
