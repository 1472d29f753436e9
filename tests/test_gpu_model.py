"""GPU-only: the model's jitted forward compiles once per shape; dense attention runs a flash kernel."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.models import Llama, preset

pytestmark = pytest.mark.gpu

MS = MSAttentionConfig(block_size=128, top_k=8, selection_source="previous", selection_heads="kv")


def _model(**kw):
    cfg = preset("llama3-8b", num_layers=2, d_model=1024, num_heads=8, num_kv_heads=2, ffn_dim=2048,
                 vocab_size=1024, dtype="bfloat16", param_dtype="bfloat16", **kw)
    return Llama(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("attention", ["ms", "dense"])
def test_jitted_forward_compiles_once(attention):
    model = _model(attention=attention, ms=MS, ms_kernel="pallas")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tokens = jnp.zeros((1, 4096), jnp.int32)
    for _ in range(3):
        jax.block_until_ready(forward(state, tokens))
    assert forward._cache_size() == 1


def test_dense_attention_is_flash_at_32k():
    """XLA's dense attention would build 32K x 32K scores per head (128 GiB); cuDNN flash runs in a few GB."""
    model = _model(attention="dense", dense_kernel="cudnn")
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 32768), jnp.int32)
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s).hidden_states(t)[0])(state, tokens)
    assert out.shape == (1, 32768, 1024) and bool(jnp.isfinite(out).all())
