"""One long-prompt inference cell at the least device time: bench_inference's cells, leaner.

``bench_inference.py`` times every prefill twice and every decode twice (the first call compiles), which at
512K tokens and 32 layers costs more than one 10-minute device call. Here, per variant (``--prefill`` of
bench_inference: ``ms`` = MS one-pass prefill into a full cache, ``ms+budget`` = into a ``--budget`` cache):

1. a prefill, compile included (``first_prefill_s``);
2. the selective decode of ``NEW`` tokens over its cache, compiled ahead of time (``select_decode_compile_s``)
   and then timed alone (``select_decode_ms_per_token``);
3. a second prefill, timed alone (``prefill_s``, the time to first token);
4. the dense decode over that cache, compiled ahead of time and timed alone (``decode_ms_per_token``).

A row is appended to OUT after each step (a run stopped by its time limit keeps what it measured); no new
variant starts after DEADLINE seconds. ``ONCE=1`` in the environment: step 1 then step 4 only (a 1M-token
prompt whose prefill alone takes minutes). Options after DEADLINE are bench_inference's.

  python experiments/benchmarks/inference_long_cell.py OUT.jsonl 524288 12 270 --prefill ms,ms+budget
  ONCE=1 python experiments/benchmarks/inference_long_cell.py OUT.jsonl 1048576 12 1000 --prefill ms+budget
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
import bench_inference as bi
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax import kvcache
from selmerge_jax.models import Llama
from selmerge_jax.models import generate as g
from selmerge_jax.models import generate_long as long

out, T, new, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
extra = sys.argv[5:]
START = time.perf_counter()
args = bi.parse_args(["--lengths", str(T), "--new", str(new)] + extra)
row = {"bench": "inference_lean", "preset": args.preset, "seq_len": T, "new_tokens": new,
       "jax": jax.__version__, "device": jax.devices()[0].device_kind}


def emit(**kw):
    row.update(kw, elapsed_s=round(time.perf_counter() - START, 1), peak_gb_process=bi._peak_gb())
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def block(x):
    jax.block_until_ready(jax.tree_util.tree_leaves(x)[0])
    return x


cfg = bi.model_config(args, "ms", T)
graphdef = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0]
state = block(jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))[1])())
model = nnx.merge(graphdef, state)
row["layers"] = cfg.num_layers
prompts = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
start = jnp.full((1,), T, jnp.int32)


def decode_timed(caches, logits, comp, sel, name):
    if sel is not None and isinstance(caches[0], kvcache.KVCache):
        caches = long.with_selection(caches, sel)
    st = nnx.split(model)[1]
    dyn = (st, caches, logits, start, jax.random.key(0), jnp.int32(0), jnp.asarray((-1,), jnp.int32))
    kw = dict(sampling=g.SamplingConfig(), max_new=new, keep_logits=False,
              cache_fn=long.decode_cache_fn(comp, sel))
    t0 = time.perf_counter()
    compiled = g._decode.lower(graphdef, *dyn, **kw).compile()
    ct = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = block(compiled(*dyn))
    dt = time.perf_counter() - t1
    del res
    emit(**{f"{name}_compile_s": round(ct, 1), f"{name}_ms_per_token": round(1e3 * dt / (new - 1), 3)})


def cell(variant):
    comp = bi.compression(args) if variant == "ms+budget" else None
    slots = bi._slots(T, new, args.block_size)
    fresh = lambda: (long.compressed_caches(cfg, 1, comp, T) if comp is not None
                     else g.init_caches(model, 1, slots))
    run = lambda: block(g.prefill(model, prompts, fresh(), prefill_attention="model", compression=comp,
                                  memory_limit=0))
    row.update(prefill=variant, budget=None if comp is None else comp.budget,
               policy=None if comp is None else comp.policy)
    for k in [k for k in row if k.endswith(("_s", "_ms_per_token", "_gb", "error")) and k != "elapsed_s"]:
        row.pop(k)
    t0 = time.perf_counter()
    logits, caches = run()
    emit(first_prefill_s=round(time.perf_counter() - t0, 2))
    if os.environ.get("ONCE"):  # one prefill (compile included), then the dense decode over its cache
        emit(cache_gb=round(sum(kvcache.nbytes(c) for c in caches) / 2**30, 3))
        decode_timed(caches, logits, comp, None, "decode")
        return
    sel = bi.selection(args, caches[0].capacity)
    if sel is not None:
        decode_timed(caches, logits, comp, sel, "select_decode")
    del caches
    t0 = time.perf_counter()
    logits, caches = run()
    ttft = time.perf_counter() - t0
    emit(prefill_s=round(ttft, 3), prefill_tokens_per_s=round(T / ttft, 1),
         cache_gb=round(sum(kvcache.nbytes(c) for c in caches) / 2**30, 3))
    if time.perf_counter() - START < deadline:
        decode_timed(caches, logits, comp, None, "decode")


for variant in args.prefill:
    if time.perf_counter() - START > deadline:
        break
    try:
        cell(variant)
    except Exception as e:  # noqa: BLE001 (an OOM is a result: write it and go on)
        emit(error=f"{type(e).__name__}: {str(e)[:300]}")
