"""``selmerge_jax.kernels.target``: the platform kernels dispatch for, overridden by ``compiling_for`` so a
program can be traced on this CPU for a GPU (the deviceless compile of experiments/benchmarks/gpu_plan.py).

Traced only: nothing here runs a GPU kernel."""

import jax
import jax.numpy as jnp
import pytest
from jaxpr_walk import equations

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.attention.selection import select_regions
from selmerge_jax.kernels import target
from selmerge_jax.kernels.block_sparse_attention import block_sparse_attention
from selmerge_jax.kernels.selective_decode.api import resolve
from selmerge_jax.layers.attention import resolve_dense_kernel

AMPERE = target.Target("gpu", compute_capability="8.0", core_count=108)


def test_defaults_are_the_attached_device():
    assert target.platform() == jax.default_backend()
    if jax.default_backend() == "cpu":
        assert target.compute_capability() is None and not target.is_hopper()
        assert target.core_count(default=7) == 7  # a CPU device reports no core_count


def test_compiling_for_overrides_then_restores_even_on_error():
    with target.compiling_for(target.HOPPER) as t:
        assert t is target.HOPPER
        assert (target.platform(), target.compute_capability(), target.is_hopper()) == ("gpu", "9.0", True)
        assert target.core_count(default=1) == 132
        with target.compiling_for(AMPERE):
            assert not target.is_hopper() and target.core_count(default=1) == 108
        assert target.is_hopper()
    with pytest.raises(RuntimeError, match="boom"), target.compiling_for(target.HOPPER):
        raise RuntimeError("boom")
    assert target.platform() == jax.default_backend()


def test_a_function_traced_here_is_traced_again_for_the_target():
    """The target keys jit's trace cache: the same jitted function, traced for this CPU and then lowered
    inside compiling_for, is traced twice (a plain context variable would hand back the CPU trace)."""
    seen = []

    @jax.jit
    def f(x):
        seen.append(target.platform())
        return x + 1

    f(jnp.ones(3))
    f.lower(jnp.ones(3))
    with target.compiling_for(target.HOPPER):
        f.lower(jnp.ones(3))
    assert seen == [jax.default_backend(), "gpu"]


def test_a_malformed_state_value_is_named():
    with pytest.raises(ValueError, match=r"selmerge_jax_compile_target='gpu': expected"):
        with target._STATE("gpu"):
            target.platform()


@pytest.mark.parametrize("kwargs, match", [
    (dict(platform="cuda"), "platform='cuda'"),
    (dict(platform="gpu", core_count=0), "core_count=0"),
    (dict(platform="gpu", compute_capability="sm_90"), "compute_capability='sm_90'"),
    (dict(platform="gpu", core_count=True), "core_count=True"),
])
def test_bad_target_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        target.Target(**kwargs)


def test_compiling_for_takes_a_target():
    with pytest.raises(TypeError, match="takes a Target"), target.compiling_for("gpu"):  # type: ignore[arg-type]
        pass


def _traced_primitives(fn, *args) -> set[str]:
    return {eqn.primitive.name for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr)}


def test_block_sparse_dispatch_follows_the_target():
    """Mosaic GPU for a Hopper, Triton for an Ampere GPU, the XLA path for this CPU: the same call, traced."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 256, heads, 64), jnp.bfloat16)
               for i, heads in enumerate((4, 2, 2)))
    plan = select_regions(q, k, MSAttentionConfig(block_size=64, top_k=1, selection_source="previous",
                                                  selection_heads="kv"), num_valid_tokens=256)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, plan)

    with target.compiling_for(target.HOPPER):
        hopper = _traced_primitives(attend, q, k, v)
    with target.compiling_for(AMPERE):
        ampere = _traced_primitives(attend, q, k, v)
    here = _traced_primitives(attend, q, k, v)
    assert "mpmd_map" in hopper and "pallas_call" not in hopper, hopper  # Mosaic GPU's primitive
    assert "pallas_call" in ampere and "mpmd_map" not in ampere, ampere
    assert not {"pallas_call", "mpmd_map"} & here, here


def test_dense_and_decode_kernels_follow_the_target():
    assert resolve_dense_kernel("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match=r"dense_kernel='cudnn' needs a GPU.*'cpu'"):
        resolve_dense_kernel("cudnn", jnp.bfloat16)
    with target.compiling_for(target.HOPPER):
        assert resolve_dense_kernel("auto", jnp.bfloat16) == "cudnn"
        assert resolve_dense_kernel("auto", jnp.float32) == "xla"
        assert resolve("auto", (1, 2, 4, 128), 128) == "pallas_triton"
    assert resolve("auto", (1, 2, 4, 128), 128) == "xla"
