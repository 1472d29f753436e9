"""Mosaic TPU block-sparse attention: the shared cases (``kernel_test_base``) in the Pallas interpreter (no
TPU here) and a native run (``tpu``)."""

import jax
import pytest
from kernel_test_base import Backend, BackendCases, assert_close, cotangent_run, reference_attention

from selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_tpu import block_sparse_attention_mosaic_tpu
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec


def _kernel(plan, interpret=True):
    return lambda q, k, v: block_sparse_attention_mosaic_tpu(q, k, v, plan, return_lse=True,
                                                             interpret=interpret)


class TestMosaicTpuCases(BackendCases):
    backend = Backend(
        name="pallas_mosaic_tpu",
        attention=lambda problem, plan: _kernel(plan),
        native=block_sparse_attention_mosaic_tpu,
        declines={},
        on_platform=lambda: jax.default_backend() == "tpu",
    )


@pytest.mark.tpu
def test_native_tpu_bf16_matches_reference():
    spec = AttentionSpec(name="tpu", seq_len=4096, q_heads=16, kv_heads=4, head_dim=128, block_size=128,
                         selected=8, ragged=0.2)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(5))
    want = cotangent_run(reference_attention(plan), q, k, v, do)(q, k, v)
    got = cotangent_run(_kernel(plan, interpret=False), q, k, v, do)(q, k, v)
    assert_close(got, want, rel=2e-2)
