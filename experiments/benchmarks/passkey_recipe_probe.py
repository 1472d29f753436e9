"""Probe for issue #7 (c), GPU-sized: which data recipe makes a byte-level Llama learn *content* passkey
retrieval?

The CPU probe (``passkey_recipe_cpu.py``) found that a model trained on one prompt length memorises the
answer's absolute position. Here every passkey prompt has a random length in ``[min_len, max_len]`` and is
packed with segment ids and restarting positions (as ``TokenWindows`` packs), so only a content-based
retrieval circuit can score; the grid is scored at several lengths *off* the training rows' lengths. Options:

* ``--curriculum F:L``: for the first fraction ``F`` of the time budget the prompts are at most ``L`` tokens
  (short key-to-question distances, where uniform attention at init still puts mass on the key's digits);
* ``--copy``: rows of random printable bytes repeated with a random period (a dense induction signal);
* ``--weight``: loss weight of the answer tokens.

Writes ``<out>/<tag>.jsonl`` (one line per evaluation). Example (one of four concurrent variants on an H100):

    python experiments/benchmarks/passkey_recipe_probe.py --tag p1 --T 1024 --B 16 --pk 0.9 --max_s 420
"""
import argparse
import json
import os
import queue
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# appended, not first: the repo root holds `kernels/`, which would shadow the installed `kernels` package
# that transformers imports
sys.path.append(os.path.join(os.path.dirname(__file__), "..", ".."))
from selmerge_jax.data.arrays import _segments
from selmerge_jax.data.synthetic import passkey_example
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.evaluation.passkey import passkey_accuracy
from selmerge_jax.models.config import preset
from selmerge_jax.models.llama import Llama

p = argparse.ArgumentParser()
p.add_argument("--tag", default="x"); p.add_argument("--out", default="runs/passkey_probe")
p.add_argument("--T", type=int, default=1024); p.add_argument("--B", type=int, default=16)
p.add_argument("--d", type=int, default=512); p.add_argument("--L", type=int, default=8)
p.add_argument("--heads", type=int, default=8); p.add_argument("--kv", type=int, default=4)
p.add_argument("--ffn", type=int, default=1536); p.add_argument("--dtype", default="bfloat16")
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--warmup", type=int, default=100)
p.add_argument("--max_s", type=float, default=300); p.add_argument("--eval_every_s", type=float, default=60)
p.add_argument("--pk", type=float, default=0.9); p.add_argument("--copy", type=float, default=0.0)
p.add_argument("--min_len", type=int, default=256); p.add_argument("--weight", type=float, default=5.0)
p.add_argument("--curriculum", default="")  # "F:L"
p.add_argument("--eval_lengths", default="")  # default: 300, T//2+37, T-29
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

tok = load_tokenizer(None)
corpus = np.load(".gpu_data/train.npy", mmap_mode="r")
W = a.T + 1
cfg = preset("tiny", d_model=a.d, num_layers=a.L, num_heads=a.heads, num_kv_heads=a.kv, ffn_dim=a.ffn,
             max_seq_len=max(4096, a.T), attention="dense", dtype=a.dtype)
model = Llama(cfg, rngs=nnx.Rngs(a.seed))
n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
cur_frac, cur_len = (float(a.curriculum.split(":")[0]),
                     int(a.curriculum.split(":")[1])) if a.curriculum else (0, W)
eval_lengths = [int(x) for x in a.eval_lengths.split(",")] if a.eval_lengths else [300, a.T // 2 + 37,
                                                                                   a.T - 29]


def pk_row(rng, max_len):
    toks = np.zeros(W, np.int32); mask = np.zeros(W - 1, np.float32); at = 0
    while at < W:
        left = W - at
        if left < a.min_len:  # too short for a prompt: a corpus snippet after a bos, no loss
            toks[at] = tok.bos_id
            i = int(rng.integers(0, len(corpus) - W)); toks[at + 1:] = corpus[i:i + left - 1]
            break
        n = int(rng.integers(a.min_len, min(max_len, left) + 1))
        if 0 < left - n < a.min_len and left <= max_len:  # absorb a tail too short for another prompt
            n = left
        ex = passkey_example(tok, n, float(rng.random()), int(rng.integers(1, 50000)))
        toks[at:at + n] = ex["tokens"]
        mask[at:at + n - 1] = 1.0
        s, e = at + int(ex["answer_start"]), at + int(ex["answer_end"])
        mask[s - 1:e - 1] = a.weight
        at += n
    return toks, mask


def corpus_row(rng):
    i = int(rng.integers(0, len(corpus) - W))
    return np.asarray(corpus[i:i + W], np.int32), np.ones(W - 1, np.float32)


def copy_row(rng):
    unit = rng.integers(32, 127, int(rng.integers(8, 257)))
    m = np.ones(W - 1, np.float32); m[:len(unit) - 1] = 0
    return np.resize(unit, W).astype(np.int32), m


def make_batch(rng, max_len):
    rows, masks = [], []
    for _ in range(a.B):
        r = rng.random()
        t, m = pk_row(rng, max_len) if r < a.pk else copy_row(rng) if r < a.pk + a.copy else corpus_row(rng)
        rows.append(t); masks.append(m)
    t = np.stack(rows)
    segs, pos = zip(*(_segments(w, tok.bos_id) for w in t), strict=True)
    return (t[:, :-1], t[:, 1:], np.stack(masks), np.stack(segs)[:, :-1], np.stack(pos)[:, :-1])


t0 = time.time()
q: queue.Queue = queue.Queue(maxsize=8)


def producer():
    rng = np.random.default_rng(a.seed)
    while True:
        el = time.time() - t0
        q.put(make_batch(rng, cur_len if el < cur_frac * a.max_s else W))


threading.Thread(target=producer, daemon=True).start()

sched = optax.join_schedules([optax.linear_schedule(0.0, a.lr, a.warmup), optax.constant_schedule(a.lr)],
                             [a.warmup])
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.95, weight_decay=0.1))
graphdef, params = nnx.split(model, nnx.Param)
opt = tx.init(params)


@jax.jit
def step(params, opt, x, y, m, seg, pos):
    def lf(p):
        lg = nnx.merge(graphdef, p)(x, pos, segment_ids=seg).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(lg, y)
        is_ans = (m > 1.0).astype(jnp.float32)
        return jnp.sum(loss * m) / jnp.sum(m), jnp.sum(loss * is_ans) / jnp.maximum(jnp.sum(is_ans), 1)
    (loss, ans), g = jax.value_and_grad(lf, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss, ans


os.makedirs(a.out, exist_ok=True)
log = open(os.path.join(a.out, f"{a.tag}.jsonl"), "a")  # noqa: SIM115 (open for the whole run)
log.write(json.dumps({"tag": a.tag, "args": vars(a), "params": int(n_params)}) + "\n"); log.flush()
s, next_eval, loss, ans = 0, a.eval_every_s, float("nan"), float("nan")
while True:
    el = time.time() - t0
    done = el >= a.max_s
    if el >= next_eval or done:
        mdl = nnx.merge(graphdef, params)
        r = passkey_accuracy(mdl, tok, eval_lengths, [0.0, 0.25, 0.5, 0.75, 1.0], per_cell=8, seed=123,
                             scoring="forward")
        acc = np.asarray(r["accuracy"]).mean(0).round(3).tolist()
        tacc = np.asarray(r["token_accuracy"]).mean(0).round(3).tolist()
        rec = {"tag": a.tag, "step": s, "t": round(el, 1), "loss": float(loss), "answer_loss": float(ans),
               "lengths": eval_lengths, "acc": acc, "tok_acc": tacc,
               "ex": [e["generated"] + "/" + str(e["passkey"]) for e in r["examples"][:4]]}
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n"); log.flush()
        next_eval = el + a.eval_every_s
        if done:
            break
    x, y, m, seg, pos = q.get()
    params, opt, loss, ans = step(params, opt, x, y, m, seg, pos)
    s += 1
    if s % 100 == 0:
        print(f"{a.tag} step {s} loss {float(loss):.3f} answer {float(ans):.3f} t {time.time() - t0:.0f}s",
              flush=True)
