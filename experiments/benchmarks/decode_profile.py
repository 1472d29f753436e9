"""Where a decode step's time goes: ms/token of the decode loop over a cache of T tokens, and its GPU kernels.

The cache is filled with random K/V (every slot a real token, positions 0..T-1) instead of running a prefill:
decode cost does not depend on how the cache was written, and a 512K, 32-layer cache is ready in a second.
Per (T, mode, loop) one JSON line: ms/token (median of ``--reps`` timed calls of ``--new`` steps, compiled
ahead of time), and with ``--trace`` the device kernels of one more call summed by kind
(``trace_summary.summarize``): ``kernel_ms`` against ``span_ms`` (first kernel start to last kernel end) says
whether the device computed or waited for the host; ``launches`` / steps is the kernels a step launches.

Modes: ``dense`` (the model's default cache attention over every slot), ``select``
(``kvcache.DecodeSelection``: top blocks + centroids). Loops: ``while`` is ``generate._decode`` (stops early
when every row has ended, so the host reads a flag back every step), ``fixed`` the same steps in a
``fori_loop`` of known trip count, ``fixed_sliced`` that loop with each step slicing the stacked layer weights
itself (before ``Llama.layer_states``). ``--select-kernel``: how a selective step attends its blocks
(``DecodeSelection.kernel``).

  python experiments/benchmarks/decode_profile.py --layers 32 --lengths 8192,524288 --trace --out r.jsonl
  JAX_PLATFORMS=cpu python experiments/benchmarks/decode_profile.py --preset tiny --lengths 512 --new 4
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
from flax import nnx

from selmerge_jax import kvcache
from selmerge_jax.kernels.selective_decode import resolve
from selmerge_jax.models import Llama, preset
from selmerge_jax.models import generate_long as long
from selmerge_jax.models.generate import SamplingConfig, _decode, decode_step

sys.path.insert(0, os.path.dirname(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--lengths", default="8192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", default="dense,select")
    p.add_argument("--loops", default="while,fixed")
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--top-m", type=int, default=32)
    p.add_argument("--select-kernel", default="auto", choices=("auto", "xla", "pallas_triton"))
    p.add_argument("--trace", action="store_true")
    p.add_argument("--tag", default="", help="a label for the row (e.g. the XLA_FLAGS variant)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.lengths = tuple(int(x) for x in args.lengths.split(","))
    args.modes = tuple(args.modes.split(","))
    args.loops = tuple(args.loops.split(","))
    for name, vals, ok in (("--modes", args.modes, {"dense", "select"}),
                           ("--loops", args.loops, {"while", "fixed", "fixed_sliced"})):
        if not set(vals) <= ok:
            p.error(f"{name}={','.join(vals)} not allowed: choose from {sorted(ok)}")
    if args.new < 2:
        p.error(f"--new={args.new}: at least 2 steps")
    return args


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def filled_caches(layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, length: int):
    """One cache per layer whose first ``length`` slots hold random tokens at positions 0..length-1."""
    def one(key):
        kk, kv = jax.random.split(key)
        shape = (batch, kv_heads, capacity, head_dim)
        pos = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), shape[:3])
        pos = jnp.where(pos < length, pos, -1)
        return kvcache.KVCache(k=jax.random.normal(kk, shape, jnp.bfloat16),
                               v=jax.random.normal(kv, shape, jnp.bfloat16), pos=pos,
                               count=(pos >= 0).astype(jnp.float32), score=jnp.zeros(shape[:3], jnp.float32),
                               length=jnp.int32(length), dropped=jnp.int32(0))
    return tuple(one(k) for k in jax.random.split(jax.random.key(1), layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "new", "cache_fn", "hoist"),
                   donate_argnames=("caches",))
def _fixed_decode(graphdef, state, caches, first, start, *, new, cache_fn, hoist=True):
    """``new`` greedy steps in a loop of known trip count (no early stop): the ``while`` loop's work alone.
    ``hoist=False``: each step slices the stacked layer weights itself (what every step did before
    ``Llama.layer_states``)."""
    model = nnx.merge(graphdef, state)
    b = first.shape[0]
    layers = model.layer_states() if hoist else None

    def body(i, carry):
        caches, tok, out = carry
        tok, _, caches = decode_step(model, caches, tok, start + i, jax.random.key(0), SamplingConfig(),
                                     cache_fn, layers)
        return caches, tok, out.at[:, i].set(tok)

    caches, _, out = jax.lax.fori_loop(0, new, body, (caches, first, jnp.zeros((b, new), jnp.int32)))
    return out, caches


def compiled_loop(loop: str, model, caches, start, new: int, cache_fn):
    """(compiled decode, its arguments but the caches): ``generate._decode`` or ``_fixed_decode``."""
    graphdef, state = nnx.split(model)
    b = start.shape[0]
    if loop == "while":
        logits = jnp.zeros((b, model.config.vocab_size), jnp.float32)
        rest = (logits, start, jax.random.key(0), jnp.int32(0), jnp.asarray((-1,), jnp.int32))
        static = dict(sampling=SamplingConfig(), max_new=new, keep_logits=False, cache_fn=cache_fn)
    else:
        rest = (jnp.zeros((b,), jnp.int32), start)
        static = dict(new=new, cache_fn=cache_fn, hoist=loop == "fixed")
    compiled = (_decode if loop == "while" else _fixed_decode).lower(graphdef, state, caches, *rest,
                                                                      **static).compile()
    return compiled, state, rest


def run(args, model, t: int, mode: str, loop: str) -> dict:
    cfg = model.config
    capacity = -(-(t + args.new * (args.reps + 2)) // args.block) * args.block
    caches = filled_caches(cfg.num_layers, args.batch, cfg.num_kv_heads, capacity, cfg.head_size, t)
    sel = None
    if mode == "select":
        sel = kvcache.DecodeSelection(block=args.block, top_m=args.top_m, sink_blocks=1, local_blocks=1,
                                      kernel=args.select_kernel)
        caches = long.with_selection(caches, sel)
    start = jnp.full((args.batch,), t, jnp.int32)
    t0 = time.perf_counter()
    cache_fn = long.decode_cache_fn(None, sel)
    compiled, state, rest = compiled_loop(loop, model, caches, start, args.new, cache_fn)
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(args.reps + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        out, caches = _tokens_and_caches(compiled(state, caches, *rest))
        jax.block_until_ready(out)
        if r:
            times.append(time.perf_counter() - t0)
        rest = _advance(loop, rest, args.new)
    row = {"bench": "decode_profile", "preset": args.preset, "layers": cfg.num_layers, "batch": args.batch,
           "cache_tokens": t, "mode": mode, "loop": loop, "new": args.new, "tag": args.tag,
           "compile_s": round(compile_s, 2),
           "ms_per_token": round(1e3 * statistics.median(times) / (args.new - (loop == "while")), 3),
           "reps": args.reps, "block": sel and sel.block, "top_m": sel and sel.top_m,
           "select_kernel": sel and resolve(sel.kernel, (args.batch, cfg.num_kv_heads,
                                                         cfg.num_heads // cfg.num_kv_heads, cfg.head_size),
                                             sel.block),
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.trace:
        from trace_summary import summarize  # beside this script

        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                out, caches = _tokens_and_caches(compiled(state, caches, *rest))
                jax.block_until_ready(out)
            s = summarize(d, top=12)
        steps = args.new - (loop == "while")
        row.update(kernel_ms_per_step=round(s["kernel_ms"] / steps, 3) if s["kernel_ms"] else None,
                   span_ms_per_step=round(s.get("span_ms", 0) / steps, 3),
                   launches_per_step=round(s.get("launches", 0) / steps, 1),
                   by_kind_ms=s.get("by_kind_ms"), top_kernels=s.get("top_kernels"))
    return row


def _tokens_and_caches(result):
    """``_decode`` returns (tokens, lengths, logits, caches), ``_fixed_decode`` (tokens, caches)."""
    return result[0], result[-1]


def _advance(loop: str, rest: tuple, new: int) -> tuple:
    """The next call's arguments: its positions follow the previous call's tokens."""
    if loop == "while":
        logits, start, *tail = rest
        return (logits, start + new - 1, *tail)
    first, start = rest
    return (first, start + new)


def main(argv=None):
    args = parse_args(argv)
    kw = dict(attention="ms", dtype="bfloat16", param_dtype="bfloat16", max_seq_len=max(args.lengths) * 2)
    if args.layers:
        kw["num_layers"] = args.layers
    cfg = preset(args.preset, **kw)
    state = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))[1])()
    model = nnx.merge(nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0], state)
    env = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "python": platform.python_version()}
    for t in args.lengths:
        for mode in args.modes:
            for loop in args.loops:
                try:
                    row = run(args, model, t, mode, loop)
                except Exception as e:  # noqa: BLE001 -- one failing cell must not lose the others
                    row = {"bench": "decode_profile", "cache_tokens": t, "mode": mode, "loop": loop,
                           "tag": args.tag, "status": "failed",
                           "reason": f"{type(e).__name__}: {str(e)[:800]}"}
                line = json.dumps({**row, **env})
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
