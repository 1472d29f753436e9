# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Quickstart: jit-compile select-and-merge attention on CPU
#
# **What it shows.** Build the `MSAttention` layer, compile it with `nnx.jit` and with plain `jax.jit`
# (split/merge), check it against dense attention (exactly equal when every earlier region is selected,
# different when only a few are), look at the layer with `nnx.display` (treescope in Jupyter, plain text
# elsewhere), and size the Llama-2-7B preset with `nnx.eval_shape` without allocating a byte of it.
#
# **How long.** About 20 s on a laptop CPU (most of it XLA compiling); no GPU, no downloads.
# Set `SELMERGE_NOTEBOOK_SMOKE=1` to shrink every size (what the test suite does).

# %%
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig, dense_attention, ms_attention
from selmerge_jax.layers import AttentionLayerConfig, MSAttention
from selmerge_jax.models import Llama, count_params, preset
from selmerge_jax.positional import RopeConfig

SMOKE = os.environ.get("SELMERGE_NOTEBOOK_SMOKE") == "1"
T = 256 if SMOKE else 2048  # tokens per sequence
print(f"jax {jax.__version__} on {jax.default_backend()}, {jax.device_count()} device(s); T={T}")

# %% [markdown]
# ## 1. One layer, two ways to compile it
#
# The config is a frozen dataclass validated on construction: a bad value fails here, with its name, not
# deep inside a kernel. Regions are `block_size` tokens; each query group (`merge` regions) attends its own
# regions causally plus the `top_k - merge` best earlier regions. `selection_source="previous"` ranks with
# the summary of the region before the group, so the layer is strictly causal.

# %%
ms = MSAttentionConfig(block_size=32, top_k=4, merge=1, selection_source="previous", selection_heads="kv")
cfg = AttentionLayerConfig(d_model=128, num_heads=4, num_kv_heads=2, ms=ms, rope=RopeConfig())
layer = MSAttention(cfg, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (2, T, cfg.d_model))

try:
    MSAttentionConfig(block_size=32, top_k=3, merge=2)
except ValueError as err:
    print("rejected:", err)


# %% [markdown]
# `nnx.jit` takes the module itself as an argument (its parameters are traced, the rest is static).
# `jax.jit` wants pytrees only: split the module into a static graph and a state pytree, merge inside.

# %%
@nnx.jit
def forward_nnx(model, x):
    return model(x)


graphdef, state = nnx.split(layer)


@jax.jit
def forward_jax(state, x):
    return nnx.merge(graphdef, state)(x)


def timed(fn, *args, repeats=3):
    """Seconds of the first call (trace + compile + run) and the best of ``repeats`` later calls."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best = min(_seconds(fn, *args) for _ in range(repeats))
    return out, first, best


def _seconds(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


y_nnx, first, best = timed(forward_nnx, layer, x)
print(f"nnx.jit: first call {first:.2f} s, then {best * 1e3:.1f} ms")
y_jax, first, best = timed(forward_jax, state, x)
print(f"jax.jit: first call {first:.2f} s, then {best * 1e3:.1f} ms")
print("same output:", bool(jnp.allclose(y_nnx, y_jax, atol=1e-6)), y_nnx.shape)

# %% [markdown]
# ## 2. Against dense attention
#
# A dense twin of the layer: same parameters (`nnx.update` copies them), `implementation="dense"`.
# With `top_k` covering every region the selection is the whole causal past, so the two layers agree to
# float32 round-off; with the sparse config they differ by what the unselected regions would have added.
# On random inputs nothing stands out, attention is spread thin over every key and that difference is
# large; notebook 02 shows a sequence with structure, where selection finds what matters.

# %%
def rel(a, b):
    """Relative L2 error of a against b."""
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def twin(ms_config, implementation="reference"):
    """A layer with the same parameters as ``layer`` and another attention config."""
    other = MSAttention(AttentionLayerConfig(d_model=cfg.d_model, num_heads=cfg.num_heads,
                                             num_kv_heads=cfg.num_kv_heads, ms=ms_config, rope=cfg.rope,
                                             implementation=implementation), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(layer))
    return other


regions = T // ms.block_size
dense_layer = twin(ms, implementation="dense")
full_layer = twin(MSAttentionConfig(block_size=32, top_k=regions, selection_source="previous"))
y_dense = forward_nnx(dense_layer, x)
y_full = forward_nnx(full_layer, x)
print(f"top_k={regions} (everything) vs dense: max |diff| = {float(jnp.abs(y_full - y_dense).max()):.2e}")
print(f"top_k={ms.top_k} (sparse)      vs dense: relative L2 error = {rel(y_nnx, y_dense):.3f}")
assert float(jnp.abs(y_full - y_dense).max()) < 1e-4

# %% [markdown]
# The same comparison on the pure functions, which also hand back the selection plan: `kv_regions
# [B, P, Q, M]` lists, per batch row, selection head and query group, the earlier regions it attends
# (`-1` = empty slot). The attended fraction is what the sparse layer pays relative to dense causal.

# %%
kq, kk, kv = jax.random.split(jax.random.key(2), 3)
q = jax.random.normal(kq, (1, T, 4, 64))
k = jax.random.normal(kk, (1, T, 2, 64))
v = jax.random.normal(kv, (1, T, 2, 64))
out, plan = jax.jit(lambda q, k, v: ms_attention(q, k, v, ms, return_plan=True))(q, k, v)
ref = dense_attention(q, k, v, causal=True)
print("plan.kv_regions", plan.kv_regions.shape, "-> group 5 of head 0 attends regions",
      np.asarray(plan.kv_regions[0, 0, 5]), "+ its own")
gt = ms.group_tokens
selected_per_group = plan.attended_tokens()[0].mean(0)  # [Q] selected keys per group, mean over heads
ms_pairs = float(selected_per_group.sum()) * gt + plan.num_groups * gt * (gt + 1) / 2  # + causal local block
attended = ms_pairs / (T * (T + 1) / 2)
print(f"attended fraction of the causal (query, key) pairs: {attended:.3f}; "
      f"relative error vs dense: {rel(out, ref):.3f}")

# %% [markdown]
# ## 3. Look at the layer
#
# `nnx.display` renders an interactive treescope view in Jupyter and falls back to `print` anywhere else
# (a terminal, CI), so this cell never fails headless.

# %%
nnx.display(layer)
params = nnx.to_flat_state(nnx.state(layer, nnx.Param))
print({"/".join(map(str, path)): tuple(p[...].shape) for path, p in params})

# %% [markdown]
# ## 4. A 7B model, abstractly
#
# `nnx.eval_shape` runs the constructor under `jax.eval_shape`: every parameter becomes a
# `ShapeDtypeStruct`, nothing is allocated. Count the parameters, the bytes per dtype, and the shape of a
# forward pass with select-and-merge attention at a long length, again without running it.

# %%
config_7b = preset("llama2-7b", attention="ms", max_seq_len=32768,
                   ms=MSAttentionConfig(block_size=64, top_k=16, selection_source="previous",
                                        selection_heads="kv"))
abstract = nnx.eval_shape(lambda: Llama(config_7b, rngs=nnx.Rngs(0)))
n_params = count_params(abstract)
print(f"llama2-7b: {n_params / 1e9:.2f} B parameters = {n_params * 4 / 2**30:.1f} GiB in float32, "
      f"{n_params * 2 / 2**30:.1f} GiB in bfloat16")
assert 6.7e9 < n_params < 6.8e9

graph_7b, state_7b = nnx.split(abstract)
t_long = 1024 if SMOKE else 32768
tokens = jax.ShapeDtypeStruct((1, t_long), jnp.int32)
logits = jax.eval_shape(lambda s, tok: nnx.merge(graph_7b, s)(tok), state_7b, tokens)
print(f"forward at T={t_long}: logits {logits.shape} {logits.dtype} "
      f"({logits.size * 4 / 2**30:.2f} GiB of float32 logits alone)")
