"""CPU probe for issue #7 (c): can a tiny byte-level Llama learn passkey retrieval under a given data recipe?

Scratch experiment driver behind the "CPU recipe" section of experiments/results/archive/h100_eval_README.md
(runs k4, k5, k7 ...): trains on .gpu_data/train.npy windows mixed with passkey prompts (the evaluation
template), copy rows or corpus-filler prompts, then scores the passkey grid at the training length with
teacher forcing. Example (k4):

    python experiments/benchmarks/passkey_recipe_cpu.py --T 320 --B 8 --d 64 --L 2 --steps 2500 \
        --loss weight:5 --ratio 0.95 --lr 3e-3 --tag k4
"""
import argparse
import os
import pickle
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# appended, not first: the repo root holds `kernels/`, which would shadow the installed `kernels` package
# that transformers imports
sys.path.append(os.path.join(os.path.dirname(__file__), "..", ".."))
from selmerge_jax.data.synthetic import passkey_example
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.evaluation.passkey import passkey_accuracy
from selmerge_jax.models.config import MSAttentionConfig, preset
from selmerge_jax.models.llama import Llama

p = argparse.ArgumentParser()
p.add_argument("--T", type=int, default=256); p.add_argument("--B", type=int, default=16)
p.add_argument("--steps", type=int, default=600); p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--d", type=int, default=128); p.add_argument("--L", type=int, default=4)
p.add_argument("--heads", type=int, default=4); p.add_argument("--kv", type=int, default=2)
p.add_argument("--ratio", type=float, default=0.5)
p.add_argument("--loss", default="all")  # all | answer | weight:N
p.add_argument("--minlen", type=int, default=0)  # >0: pack short prompts of random length [minlen, T+1]
p.add_argument("--attn", default="dense"); p.add_argument("--bs", type=int, default=16)
p.add_argument("--topk", type=int, default=4)
p.add_argument("--filler", default="std"); p.add_argument("--copy", type=float, default=0.0)
p.add_argument("--tag", default="x"); p.add_argument("--warm", type=int, default=0)
p.add_argument("--eval_every", type=int, default=200)
a = p.parse_args()
tok = load_tokenizer(None)
corpus = np.load(".gpu_data/train.npy", mmap_mode="r")
rng = np.random.default_rng(0)
cfg = preset("tiny", d_model=a.d, num_layers=a.L, num_heads=a.heads, num_kv_heads=a.kv, ffn_dim=a.d * 3,
             attention=a.attn,
             ms=MSAttentionConfig(block_size=a.bs, top_k=a.topk, selection_source="previous",
                                  selection_heads="kv"))
model = Llama(cfg, rngs=nnx.Rngs(0))
print("params", sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
W = a.T + 1

def pk_row():
    toks = np.zeros(W, np.int32); mask = np.zeros(W - 1, np.float32); pos = 0
    while pos < W:
        left = W - pos
        n = left if a.minlen == 0 else int(rng.integers(a.minlen, W + 1))
        if left - n < a.minlen:  # the last one fills the rest
            n = left
        ex = passkey_example(tok, n, float(rng.random()), int(rng.integers(1, 50000)))
        if a.filler == "corpus" or (a.filler == "mix" and rng.random() < 0.5):
            ex = corpus_filler(ex)
        toks[pos:pos + n] = ex["tokens"]
        s, e = pos + int(ex["answer_start"]), pos + int(ex["answer_end"])
        if a.loss == "all":
            mask[pos:pos + n - 1] = 1
        elif a.loss == "answer":
            mask[s - 1:e - 1] = 1
        else:
            w = float(a.loss.split(":")[1]); mask[pos:pos + n - 1] = 1; mask[s - 1:e - 1] = w
        pos += n
    return toks, mask

from selmerge_jax.data.synthetic import PASSKEY_TASK

HEAD = len(tok.encode(PASSKEY_TASK + "\n")) + 1
def corpus_filler(ex):
    # replace the standard filler by a random corpus snippet repeated (copyable only by induction)
    t = ex["tokens"].copy(); kp = int(ex["key_position"]); s0 = int(ex["answer_start"])
    info_len = len(tok.encode(f"\nThe pass key is {int(ex['passkey'])}. Remember it. "
                              f"{int(ex['passkey'])} is the pass key.\n"))
    q_len = len(tok.encode("\nWhat is the pass key? The pass key is"))
    n_fill = s0 - q_len - info_len - HEAD
    u = int(rng.integers(24, 128))
    while True:
        i = int(rng.integers(0, len(corpus) - u)); unit = np.asarray(corpus[i:i + u], np.int32)
        if unit.max() < 256: break
    fill = np.resize(unit, n_fill); cut = kp - HEAD
    t[HEAD:kp] = fill[:cut]; t[kp + info_len:kp + info_len + n_fill - cut] = fill[cut:]
    ex = dict(ex); ex["tokens"] = t; return ex

def batch():
    rows, masks = [], []
    for _ in range(a.B):
        r = rng.random()
        if r < a.copy:  # random bytes (length 8-64) repeated: induction heads form on these within ~150 steps
            u = rng.integers(32, 127, int(rng.integers(8, 65))); t = np.resize(u, W).astype(np.int32)
            m = np.ones(W - 1, np.float32)
            m[:len(u) - 1] = 0
        elif r < a.copy + a.ratio:
            t, m = pk_row()
        else:
            i = int(rng.integers(0, len(corpus) - W)); t = np.asarray(corpus[i:i + W], np.int32)
            m = np.ones(W - 1, np.float32)
        rows.append(t); masks.append(m)
    t = np.stack(rows); return t[:, :-1], t[:, 1:], np.stack(masks)

sched = optax.warmup_cosine_decay_schedule(0, a.lr, 50, a.steps, a.lr * 0.1)
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.05))
graphdef, params = nnx.split(model, nnx.Param)
opt = tx.init(params)

@jax.jit
def step(params, opt, x, y, m):
    def lf(p):
        lg = nnx.merge(graphdef, p)(x)
        l = optax.softmax_cross_entropy_with_integer_labels(lg, y)
        return jnp.sum(l * m) / jnp.sum(m)
    l, g = jax.value_and_grad(lf)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l

def diag(mdl):
    # mean loss on: 2nd mention digits (short copy), answer digits (long copy)
    exs = [passkey_example(tok, a.T + 1, float(d), int(k)) for d,
           k in zip(np.linspace(0, 1, 8), range(41234, 41234 + 8 * 977, 977))]
    t = np.stack([e["tokens"] for e in exs]); lg = mdl(t[:, :-1])
    l = np.asarray(optax.softmax_cross_entropy_with_integer_labels(lg, t[:, 1:]))
    sec, ans = [], []
    for i, e in enumerate(exs):
        kp = int(e["key_position"]); k = str(int(e["passkey"])); info = tok.decode(t[i, kp:kp + 60])
        j = info.index(k, info.index(k) + 1)  # second mention offset
        sec.append(l[i, kp + j - 1:kp + j - 1 + len(k)].mean()); s0 = int(e["answer_start"])
        ans.append(l[i, s0:s0 + len(k)].mean())
    u = np.random.default_rng(5).integers(32, 127, (4, 40)); ct = np.tile(u, (1, 5))
    cl = np.asarray(optax.softmax_cross_entropy_with_integer_labels(mdl(ct[:, :-1]), ct[:, 1:]))[:,
                                                                                                 40:].mean()
    print(f"  diag: copy-row loss {cl:.2f}", flush=True)
    print(f"  diag: 2nd-mention digit loss {np.mean(sec):.2f}  answer digit loss {np.mean(ans):.2f} "
          f"(uniform {np.log(10):.2f})", flush=True)

t0 = time.time()
def warm_batch():
    t = np.stack([np.resize(rng.integers(32, 127, int(rng.integers(8, 33))),
                            129) for _ in range(32)]).astype(np.int32)
    m = np.ones((32, 128), np.float32); return t[:, :-1], t[:, 1:], m

for s in range(1, a.steps + 1):
    x, y, m = warm_batch() if s <= a.warm else batch()
    params, opt, l = step(params, opt, x, y, m)
    if s % 50 == 0:
        print(f"step {s} loss {float(l):.3f} t {time.time()-t0:.0f}s", flush=True)
    if s % a.eval_every == 0 or s == a.steps:
        mdl = nnx.merge(graphdef, params)
        r = passkey_accuracy(mdl, tok, [a.T], [0.0, 0.25, 0.5, 0.75, 1.0], per_cell=8, seed=123,
                             scoring="forward")
        diag(mdl)
        print(f"  PK step {s}: acc {r['mean_accuracy']:.2f} tokacc {np.mean(r['token_accuracy']):.2f} ex "
              f"{[e['generated'] + '/' + str(e['passkey']) for e in r['examples'][:3]]}", flush=True)

os.makedirs("runs", exist_ok=True)
with open(f"runs/passkey_recipe_{a.tag}.pkl", "wb") as f:  # for re-scoring at other lengths
    pickle.dump(jax.device_get(nnx.to_pure_dict(params)), f)
