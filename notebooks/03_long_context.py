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
# # 03 · A long-context study: passkey grid, position rules, KV-cache compression
#
# **What it shows.** Load a model (a checkpoint of ours, or the tiny preset initialised at random), choose
# the position rule used at inference in one cell, run the passkey-retrieval grid (context length x key
# depth) through chunked prefill and greedy decoding, and draw the accuracy heat map. Then decode the same
# prompts with KV-cache compression policies (StreamingLLM, H2O, SnapKV) at a fixed keep ratio and measure
# how far the continuations drift from the uncompressed ones (kept ratio, Jaccard, exact prefix, ROUGE-L).
#
# **How long.** About 1 min on a laptop CPU with the tiny preset (every prompt width compiles once);
# `SELMERGE_NOTEBOOK_SMOKE=1` shrinks the grid for the test suite.
#
# **Read the numbers right.** A randomly initialised model retrieves nothing: its heat map is all zeros and
# its continuations are noise, so this run exercises the pipeline, not the method. Point
# `SELMERGE_CHECKPOINT` at a run directory's `checkpoints/` (e.g. from `experiments/pretrain.py` with passkey
# data mixed in) to study a trained model with exactly the same cells.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.data.synthetic import passkey_example
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.evaluation.common import ModelSource, load_model, with_rope
from selmerge_jax.evaluation.fidelity import compare, compressed_generate
from selmerge_jax.evaluation.passkey import passkey_accuracy
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.models import Llama, count_params, preset
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig

SMOKE = os.environ.get("SELMERGE_NOTEBOOK_SMOKE") == "1"
CHECKPOINT = os.environ.get("SELMERGE_CHECKPOINT")  # an orbax run directory (".../checkpoints"), or None
LENGTHS = (256, 512) if SMOKE else (512, 1024, 2048, 4096)  # prompt + answer tokens (bytes)
DEPTHS = (0.0, 1.0) if SMOKE else (0.0, 0.25, 0.5, 0.75, 1.0)

# %% [markdown]
# ## 1. The model

# %%
if CHECKPOINT:
    model = load_model(ModelSource(init=InitConfig(kind="checkpoint", path=CHECKPOINT)))
else:
    ms = MSAttentionConfig(block_size=16, top_k=4, selection_source="previous", selection_heads="kv")
    model = Llama(preset("tiny", attention="ms", ms=ms), rngs=nnx.Rngs(0))
tokenizer = ByteTokenizer()
print(f"{count_params(model):,} parameters; attention={model.config.attention}, "
      f"rope={model.config.rope.rope_type}, {model.config.num_layers} layers")

# %% [markdown]
# ## 2. Choose the position rule
#
# Any `RopeConfig` applies at inference without touching the weights (`with_rope` swaps the config).
# The CRD NTK inference rule is the fixed-base NTK rule with the extension factor `A`:
# `base' = base * A^(d/(d-2))`, positions unwrapped. Try `RopeConfig()` (the model's plain RoPE),
# `RopeConfig(rope_type="linear", factor=4.0)` (position interpolation) or
# `RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024)`.

# %%
ROPE = RopeConfig(rope_type="ntk", factor=4.0)
model = with_rope(model, ROPE)
label = f"{ROPE.rope_type} x{ROPE.factor:g}"

# %% [markdown]
# ## 3. The passkey grid
#
# `passkey_accuracy` builds one prompt per cell (the number hidden at the given depth of repeated filler,
# then asked for), decodes greedily through the chunked prefill of `models.generate`, and counts a cell as
# retrieved when every answer token matches. `token_accuracy` gives partial credit per digit.

# %%
result = passkey_accuracy(model, tokenizer, LENGTHS, DEPTHS, per_cell=1, chunk_size=128)
accuracy = np.asarray(result["accuracy"])  # [depths, lengths]

fig, ax = plt.subplots(figsize=(1.4 * len(LENGTHS) + 2, 0.5 * len(DEPTHS) + 2))
image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
ax.set(xticks=range(len(LENGTHS)), xticklabels=LENGTHS, yticks=range(len(DEPTHS)), yticklabels=DEPTHS,
       xlabel="context tokens", ylabel="key depth (0 = start)", title=f"passkey retrieval, RoPE {label}")
fig.colorbar(image, ax=ax, label="exact retrieval")
plt.show()
print(f"mean accuracy {result['mean_accuracy']:.2f}; seconds per length:",
      [round(s, 1) for s in result["seconds_per_length"]])
for ex in result["examples"][:3]:
    print(f"  length {ex['length']}, depth {ex['depth']}: key {ex['passkey']}, generated {ex['generated']!r}")

# %% [markdown]
# ## 4. KV-cache compression: retrieval and fidelity
#
# Passkey prompts again, decoded once with the full cache and once per policy with the cache cut to a
# quarter of the prompt after prefill (and held at that budget while decoding). `retrieved` is passkey
# accuracy under compression (did the key survive eviction?); fidelity compares the two greedy
# continuations: token-set Jaccard, exact-prefix length (tokens until the first disagreement) and ROUGE-L
# F1; `kept` checks the budget was honoured.

# %%
PROMPT = 512 if SMOKE else 2048  # a multiple of the prefill chunk
NEW_TOKENS = 16 if SMOKE else 32
POLICIES = ("h2o",) if SMOKE else ("streaming", "h2o", "snapkv", "tova")
examples = [passkey_example(tokenizer, PROMPT + 6, depth, 10_000 + i) for i, depth in enumerate((0.2, 0.8))]
prompts = np.stack([ex["tokens"][:ex["answer_start"]] for ex in examples])  # the answer " 1000i" is 6 bytes
answers = np.stack([ex["tokens"][ex["answer_start"]:] for ex in examples])
assert prompts.shape == (2, PROMPT)


def retrieved(tokens):
    """Fraction of prompts whose continuation starts with the answer."""
    return float(np.mean(np.all(tokens[:, :answers.shape[1]] == answers, axis=1)))


reference, _ = compressed_generate(model, prompts, KVCompressionConfig(policy="none"),
                                   max_new_tokens=NEW_TOKENS, chunk_size=64)
print(f"{'policy':<10} {'kept':>6} {'retrieved':>10} {'Jaccard':>8} {'prefix':>7} {'ROUGE-L':>8}")
print(f"{'none':<10} {1.0:>6.2f} {retrieved(reference):>10.2f}")
for policy in POLICIES:
    out, kept = compressed_generate(model, prompts, KVCompressionConfig(policy=policy, ratio=0.25),
                                    max_new_tokens=NEW_TOKENS, chunk_size=64)
    scores = [compare(r, o) for r, o in zip(reference, out, strict=True)]
    mean = {name: np.mean([s[name] for s in scores]) for name in scores[0]}
    print(f"{policy:<10} {kept.mean():>6.2f} {retrieved(out):>10.2f} {mean['jaccard']:>8.2f} "
          f"{mean['exact_prefix']:>7.1f} {mean['rouge_l']:>8.2f}")
    assert np.all(kept <= 0.25 + 1 / PROMPT)  # the budget is a whole number of slots
