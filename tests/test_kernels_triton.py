"""Pallas Triton block-sparse attention: the shared cases (``kernel_test_base``) in interpret mode, the Triton
specifics (dQ written into the forward output's buffer, what it cannot tile) and native GPU runs (``gpu``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_base import Backend, BackendCases, assert_close, cotangent_run, inputs, reference_attention

from selmerge_jax.kernels.block_sparse_attention.pallas_triton import (
    TritonTiling,
    block_sparse_attention_triton,
)
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec

# Tiny tiles so the kernels still walk several tiles and several loop trips per program on tiny problems.
_TINY = TritonTiling(rows_fwd=32, block_k_fwd=32, rows_dq=32, block_k_dq=16, rows_dkv=16, block_k_dkv=32)


def _kernel(plan, tiling=_TINY, interpret=True):
    return lambda q, k, v: block_sparse_attention_triton(q, k, v, plan, return_lse=True, tiling=tiling,
                                                         interpret=interpret)


class TestTritonCases(BackendCases):
    backend = Backend(
        name="pallas_triton",
        attention=lambda problem, plan: _kernel(plan),
        native=block_sparse_attention_triton,
        declines={"bf16_g3_b2": "power-of-two number of heads"},
        on_platform=lambda: jax.default_backend() == "gpu",
    )


def test_gradients_alone_reuse_the_output_buffer():
    """dQ is written into the forward output's buffer. With the output not returned (XLA keeps no copy) the
    gradients still equal the reference's; the shared cases return both (XLA must copy first)."""
    (q, k, v, plan, do), _ = inputs("tiny_g4_h64_w64")
    grads = lambda attn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)[0].astype(jnp.float32) * do),
                                          argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), grads(_kernel(plan)), grads(reference_attention(plan))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-5, atol=2e-5,
                                   err_msg=name)


def test_rejects_what_it_cannot_tile():
    (q, k, v, plan, _), _ = inputs("tiny_g4_h64_w64")
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
    want = cotangent_run(reference_attention(plan), q, k, v, do)(q, k, v)
    run = cotangent_run(_kernel(plan, TritonTiling(), interpret=False), q, k, v, do)
    got = run(q, k, v)
    assert_close(got, want, rel=2e-2)
    for a, b in zip(got, run(q, k, v)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
