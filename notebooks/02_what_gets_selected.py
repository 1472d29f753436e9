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
# # 02 · What gets selected
#
# **What it shows.** On a synthetic passkey prompt (a number hidden inside repeated filler, then asked
# for), the selection plan drawn as a *query group x key region* image, the fraction of causal
# (query, key) pairs it attends, and how `top_k`, `block_size`, `merge`, `selection_source` and
# `centroids` change the picture and the error against dense attention.
#
# To make selection *mean* something without training a model, queries and keys come from a hand-wired
# "retrieval head": every byte gets a random query and key vector, digit keys also carry a shared
# direction `u`, and the question's queries carry `u` too. A trained model learns heads like this; here
# we wire one up so the needle is findable and we can see whether selection finds it.
#
# **How long.** About 30 s on a laptop CPU (each configuration compiles once). `SELMERGE_NOTEBOOK_SMOKE=1`
# shrinks the prompt for the test suite.

# %%
import dataclasses
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from selmerge_jax.attention import MSAttentionConfig, dense_attention, ms_attention
from selmerge_jax.data.synthetic import PASSKEY_QUESTION, passkey_example
from selmerge_jax.data.tokenizer import ByteTokenizer

SMOKE = os.environ.get("SELMERGE_NOTEBOOK_SMOKE") == "1"
LENGTH = 1024 if SMOKE else 4096  # tokens (bytes) in the prompt
H = 64  # head dim of the wired head

# %% [markdown]
# ## 1. The prompt and the wired head

# %%
tokenizer = ByteTokenizer()
example = passkey_example(tokenizer, LENGTH, depth=0.3, passkey=52817)
tokens = example["tokens"]
answer_start = int(example["answer_start"])
question_start = answer_start - len(tokenizer.encode("\n" + PASSKEY_QUESTION))
print(repr(tokenizer.decode(tokens[int(example["key_position"]):][:64])), "...")
print(repr(tokenizer.decode(tokens[question_start:])))

key_q, key_k, key_u, key_v = jax.random.split(jax.random.key(0), 4)
table_q = jax.random.normal(key_q, (tokenizer.vocab_size, H))
table_k = jax.random.normal(key_k, (tokenizer.vocab_size, H))
u = jax.random.normal(key_u, (H,))
u = u / jnp.linalg.norm(u) * jnp.sqrt(H)  # as long as a random row, so strength 3 means "3x the noise"

is_digit = (tokens >= ord("0")) & (tokens <= ord("9"))
is_digit[answer_start:] = False  # the answer itself is what we ask for, not a key to find
asks = np.arange(LENGTH) >= question_start
q = (table_q[tokens] + 3.0 * asks[:, None] * u)[None, :, None, :]  # [B=1, T, N=1, H]
k = (table_k[tokens] + 3.0 * is_digit[:, None] * u)[None, :, None, :]  # [B=1, T, K=1, H]
v = jax.random.normal(key_v, k.shape)
dense = dense_attention(q, k, v, causal=True)


def needle_regions(block_size):
    """Regions holding the passkey digits (before the answer)."""
    return sorted({int(r) for r in np.flatnonzero(is_digit) // block_size})


print("needle regions at block_size=64:", needle_regions(64))


# %% [markdown]
# ## 2. Helpers: the plan as an image, the attended fraction
#
# `ms_attention(..., return_plan=True)` returns the output and the `SelectionPlan`; `kv_regions [B, P, Q, M]`
# lists the earlier regions each query group attends (`-1` = empty slot), its own `merge` regions come on
# top (causally).

# %%
def run(config):
    """Output, plan and attended fraction of MS attention on the wired head."""
    out, plan = jax.jit(lambda q, k, v: ms_attention(q, k, v, config, return_plan=True))(q, k, v)
    return out, plan, attended_fraction(plan)


def plan_image(plan, head=0):
    """``[Q, R]``: 1 = selected region, 0.5 = the group's own (local) regions, 0 = not attended."""
    img = np.zeros((plan.num_groups, plan.num_regions))
    rows = np.asarray(plan.kv_regions[0, head])
    valid = np.asarray(plan.valid_mask()[0, head])
    for g in range(plan.num_groups):
        img[g, rows[g][valid[g]]] = 1.0
        img[g, g * plan.merge:(g + 1) * plan.merge] = 0.5
    return img


def attended_fraction(plan):
    """Attended (query, key) pairs over the T(T+1)/2 pairs of dense causal attention (mean over heads)."""
    gt = plan.group_tokens
    t = plan.num_groups * gt
    selected = float(plan.attended_tokens()[0].mean(0).sum()) * gt
    local = plan.num_groups * gt * (gt + 1) / 2
    return (selected + local) / (t * (t + 1) / 2)


def rel_error(out):
    return float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense))


def finds_needle(plan, head=0):
    """Does the group holding the last question token select a needle region?"""
    rows = set(np.asarray(plan.kv_regions[0, head, (answer_start - 1) // plan.group_tokens]).tolist())
    return bool(rows & set(needle_regions(plan.block_size)))


def show(ax, plan, title):
    ax.imshow(plan_image(plan), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for r in needle_regions(plan.block_size):
        ax.axvline(r, color="tab:red", lw=0.8, alpha=0.6)
    ax.set(title=title, xlabel="key region", ylabel="query group")


# %% [markdown]
# ## 3. One plan
#
# Black: selected regions; grey diagonal: each group's own regions; red lines: the regions holding the
# passkey. Early groups have fewer candidates than `top_k - merge` and attend everything before them
# (the dense triangle in the corner); later groups keep `top_k - merge` regions each. Groups after the
# question start pick the needle regions: the wired head's query direction matches the digits' keys.

# %%
base = MSAttentionConfig(block_size=64, top_k=4, merge=1, selection_source="group")
out, plan, frac = run(base)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
show(ax0, plan, f"block_size=64, top_k=4: attends {frac:.1%} of dense")
per_group = (np.asarray(plan.attended_tokens()[0, 0]) + plan.group_tokens) / (
    (np.arange(plan.num_groups) + 1) * plan.group_tokens)
ax1.plot(per_group, marker=".")
ax1.set(title="keys attended / causal keys, per query group", xlabel="query group", ylim=(0, 1.05))
plt.tight_layout()
plt.show()
print(f"relative error vs dense: {rel_error(out):.3f}; last group finds the needle: {finds_needle(plan)}")
assert finds_needle(plan)

# %% [markdown]
# ## 4. Turning the knobs
#
# Every panel changes one field of the config above. `top_k` buys accuracy with compute; `block_size`
# trades selection resolution against summary quality and kernel efficiency; `merge` lets several query
# regions share one selection (fewer, larger gathers: what the paper's kernels want), at the price of
# coarser choices; `selection_source="previous"` ranks with the region before the group, so the rows shift
# by one group and become strictly causal.

# %%
variants = {
    "top_k=2": {"top_k": 2},
    "top_k=8": {"top_k": 8},
    "block_size=32": {"block_size": 32},
    "block_size=128": {"block_size": 128},
    "merge=2, top_k=6": {"merge": 2, "top_k": 6},
    "merge=4, top_k=8": {"merge": 4, "top_k": 8},
    "source=previous": {"selection_source": "previous"},
    "sink=1": {"sink": 1},
}
if SMOKE:  # the test only needs every knob to run once
    variants = {name: variants[name] for name in ("top_k=8", "merge=2, top_k=6", "source=previous")}

rows = []
fig, axes = plt.subplots(2, -(-len(variants) // 2), figsize=(3.2 * -(-len(variants) // 2), 6.4),
                         squeeze=False)
for ax, (name, change) in zip(axes.flat, variants.items()):
    config = dataclasses.replace(base, **change)  # validated again in __post_init__
    out, plan, frac = run(config)
    show(ax, plan, f"{name}: {frac:.0%}")
    rows.append((name, frac, rel_error(out), finds_needle(plan)))
for ax in axes.flat[len(variants):]:
    ax.axis("off")
plt.tight_layout()
plt.show()

print(f"{'variant':<18} {'attended':>9} {'rel. error':>11} {'finds needle':>13}")
for name, frac, err, found in rows:
    print(f"{name:<18} {frac:>9.1%} {err:>11.3f} {found!s:>13}")

# %% [markdown]
# ## 5. Centroids: seeing the rest without attending it
#
# `centroids=True` leaves the plan unchanged and adds one merged token per *unselected* earlier region
# (its mean K and mean V, with `log W` added to its logit so it weighs like the W tokens it replaces). The
# output error against dense falls, for a cost of one extra key per region.

# %%
top_ks = (2, 8) if SMOKE else (2, 4, 8, 16)
print(f"{'top_k':>5} {'attended':>9} {'error':>7} {'error with centroids':>21}")
for top_k in top_ks:
    plain = MSAttentionConfig(block_size=64, top_k=top_k, selection_source="group")
    merged = MSAttentionConfig(block_size=64, top_k=top_k, selection_source="group", centroids=True)
    out, _, frac = run(plain)
    out_c, _, _ = run(merged)
    print(f"{top_k:>5} {frac:>9.1%} {rel_error(out):>7.3f} {rel_error(out_c):>21.3f}")
