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
# # 04 · Sharding the sequence: ring attention on 8 CPU devices
#
# **What it shows.** Eight virtual CPU devices, a mesh with a `seq` axis, the sequence split over it in the
# zig-zag layout (balanced causal work), and ring attention inside `jax.shard_map` (K/V hop around the ring
# with `ppermute`, partial softmaxes merged in float32) checked against single-device dense attention;
# then select-and-merge attention over the same ring against single-device `ms_attention`, and the
# gradients of both.
#
# **How long.** About 30 s on a laptop CPU. `SELMERGE_NOTEBOOK_SMOKE=1` shrinks sizes for the test suite.
#
# The first cell must run before JAX creates its CPU backend (restart the kernel if JAX was imported
# already): `jax_num_cpu_devices` splits the host into 8 devices. On a GPU/TPU host, drop the two config
# lines and the same code shards over the real accelerators.

# %%
import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
print(jax.devices())

# %%
import os
from functools import partial

import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from selmerge_jax.attention import MSAttentionConfig, dense_attention, ms_attention
from selmerge_jax.sharding.layouts import from_layout, to_layout
from selmerge_jax.sharding.mesh import MeshConfig, make_mesh
from selmerge_jax.sharding.ring import ring_attention
from selmerge_jax.sharding.ring_ms import ring_ms_attention

jax.config.update("jax_default_matmul_precision", "highest")  # compare f32 results, not TF32-like rounding
SMOKE = os.environ.get("SELMERGE_NOTEBOOK_SMOKE") == "1"
T = 512 if SMOKE else 4096  # global sequence length
B, N, K, H = 1, 4, 2, 32  # GQA: 4 query heads share 2 kv heads

# %% [markdown]
# ## 1. The mesh
#
# `MeshConfig` names the library's three axes, `data`, `fsdp` and `seq`; here all 8 devices go to `seq`.
# Batches are sharded over `(data, fsdp)` on B and over `seq` on T.

# %%
mesh = make_mesh(MeshConfig(data=1, fsdp=1, seq=8))
n = mesh.shape["seq"]
print(mesh)

kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (B, T, N, H))
k = jax.random.normal(kk, (B, T, K, H))
v = jax.random.normal(kv, (B, T, K, H))

# %% [markdown]
# ## 2. Zig-zag layout
#
# Causal attention is lopsided if device i holds tokens `[i*T/n, (i+1)*T/n)`: the last device attends to
# everything, the first to almost nothing. Zig-zag cuts the sequence into `2n` chunks and gives device i
# chunks `i` and `2n-1-i`. `to_layout` permutes once, at the data layer; then an even split of T over
# `seq` hands every device its two chunks.

# %%
chunk = T // (2 * n)
print("device -> global chunks:", {d: (d, 2 * n - 1 - d) for d in range(n)})
seq_sharding = NamedSharding(mesh, P(None, "seq"))
qz, kz, vz = (jax.device_put(to_layout(x, "zigzag", n), seq_sharding) for x in (q, k, v))
jax.debug.visualize_array_sharding(qz[0, :, 0, :])


# %% [markdown]
# ## 3. Ring attention vs one device
#
# `jax.shard_map` runs the function once per device on its local `[B, T/n, ., H]` block. Inside,
# `ring_attention` rotates K/V around the `seq` axis for n steps; with zig-zag every off-diagonal step is
# exactly half a block of work, so nothing is masked away.

# %%
@jax.jit
def ring_dense(q, k, v):
    spec = P(None, "seq")
    return jax.shard_map(partial(ring_attention, axis_name="seq", layout="zigzag", block_size=32),
                         mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)


out_zigzag = ring_dense(qz, kz, vz)
print("ring output stays sharded over the sequence:", out_zigzag.sharding.spec)
out_ring = from_layout(out_zigzag, "zigzag", n)
ref = dense_attention(q, k, v, causal=True)
err = float(jnp.abs(out_ring - ref).max())
print(f"ring (8 devices) vs dense (1 device): max |diff| = {err:.2e}")
assert err < 1e-4

# %% [markdown]
# ## 4. Select-and-merge over the ring
#
# Selection needs the whole sequence, but only through region summaries (W times smaller than K), so each
# device all-gathers the summaries and builds the plan rows of *its own* query groups, identical to the
# single-device plan. Each ring step then computes only the selected blocks of the visiting shard, and a
# step with nothing selected is skipped. The contiguous layout lets causal steps after the local queries be
# skipped outright, which is why it is the default here.

# %%
ms = MSAttentionConfig(block_size=16, top_k=4, selection_source="previous", selection_heads="kv",
                       centroids=True)
spec = P(None, "seq")
ring_ms = jax.jit(jax.shard_map(partial(ring_ms_attention, config=ms, axis_name="seq", layout="contiguous"),
                                mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
qc, kc, vc = (jax.device_put(x, seq_sharding) for x in (q, k, v))  # contiguous: no permutation
out_ms_ring = ring_ms(qc, kc, vc)
out_ms = ms_attention(q, k, v, ms)
err = float(jnp.abs(out_ms_ring - out_ms).max())
print(f"ring select-and-merge vs single-device ms_attention: max |diff| = {err:.2e}")
assert err < 1e-4

# %% [markdown]
# ## 5. Gradients through the ring
#
# Ring attention has a custom VJP: the backward pass rotates K/V again, recomputes each step and sends
# the dK/dV accumulators around the ring home. The gradients equal the single-device ones.

# %%
def loss_ring(q, k, v):
    return jnp.sum(from_layout(ring_dense(q, k, v), "zigzag", n) ** 2)


def loss_dense(q, k, v):
    return jnp.sum(dense_attention(q, k, v, causal=True) ** 2)


grads_ring = jax.jit(jax.grad(loss_ring, argnums=(0, 1, 2)))(qz, kz, vz)
grads_ref = jax.grad(loss_dense, argnums=(0, 1, 2))(q, k, v)
for name, g_ring, g_ref in zip("qkv", grads_ring, grads_ref, strict=True):
    diff = float(jnp.abs(from_layout(g_ring, "zigzag", n) - g_ref).max())
    print(f"d{name}: max |diff| = {diff:.2e}")
    assert diff < 1e-3
