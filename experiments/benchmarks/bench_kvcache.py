"""Decode-step latency and memory vs context length: uncompressed cache vs each compression policy.

The model is an attention-only layer stack with random bf16 weights and a Llama-3-8B attention shape (D=4096,
N=32 query heads, K=8 kv heads, H=128; ``--layers`` layers, residual adds, no MLP: the MLP cost does not
depend on the context, the cache does). For each context length S the per-layer caches are filled with random
K/V as after a prefill (uncompressed: S tokens; compressed: ``ratio * S`` tokens, the state right after a
prefill compression), then ``--steps`` jitted decode steps run with the caches donated; compressions fire
inside the step every ``slack`` tokens, so their cost is included in the mean. One JSON line per (S, policy)::

    python experiments/benchmarks/bench_kvcache.py --contexts 8192 524288 1048576 \
        --out experiments/results/kvcache_h100/run.jsonl
    python experiments/benchmarks/bench_kvcache.py --tiny          # CPU smoke run

Memory fields: ``cache_bytes`` (real bytes of all layer caches, quantized ones included), ``step_temp_bytes``
(XLA's temp allocation for one step), ``live_bytes`` (device bytes in use after the run: weights + caches),
``peak_est_bytes = live_bytes + step_temp_bytes``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from selmerge_jax.kvcache import cache as kc
from selmerge_jax.kvcache import policies as kp
from selmerge_jax.kvcache import quant as kq
from selmerge_jax.kvcache import query_select as qs
from selmerge_jax.kvcache.config import KVCompressionConfig

VARIANTS = ("none", "streaming", "h2o", "snapkv", "tova", "h2o+int8", "select")


@dataclasses.dataclass(frozen=True)
class Shape:
    d: int = 4096
    n: int = 32
    k: int = 8
    h: int = 128
    layers: int = 4


def config_for(variant: str, ratio: float | None, slack: int,
               budget: int | None = None) -> KVCompressionConfig:
    """The compression of a variant: a ``ratio`` of the context, or an absolute ``budget`` (slots per
    layer)."""
    if variant in ("none", "select"):
        return KVCompressionConfig(policy="none")
    policy, _, quant = variant.partition("+")
    size = {"ratio": ratio} if budget is None else {"budget": budget}
    return KVCompressionConfig(policy=policy, slack=slack, quant=quant or "none", quant_group=32,
                               quant_window=32,
                               **size)


def init_weights(key, s: Shape, dtype):
    ks = jax.random.split(key, 4 * s.layers)
    mk = lambda k, a, b: (jax.random.normal(k, (a, b), jnp.float32) / a**0.5).astype(dtype)
    return [{"wq": mk(ks[4 * i], s.d, s.n * s.h), "wk": mk(ks[4 * i + 1], s.d, s.k * s.h),
                 "wv": mk(ks[4 * i + 2], s.d, s.k * s.h), "wo": mk(ks[4 * i + 3], s.n * s.h, s.d)}
            for i in range(s.layers)]


def filled_cache(key, s: Shape, capacity: int, tokens: int, context: int, dtype, config, variant):
    """A cache holding ``tokens`` random K/V spread over positions ``[0, context)`` (newest at context-1)."""
    kk, kv = jax.random.split(key)
    pos = jnp.linspace(0, context - 1, tokens).astype(jnp.int32)[None]
    k = jax.random.normal(kk, (1, tokens, s.k, s.h), dtype)
    v = jax.random.normal(kv, (1, tokens, s.k, s.h), dtype)
    if config.quant != "none":
        c = kq.init_quantized(config, 1, s.k, capacity, s.h, dtype)
        fc = kc.append(kq.as_float_cache(c), k, v, pos)
        return dataclasses.replace(kq._from_float(c, fc), length=fc.length)
    c = kp.init_for(config, 1, s.k, capacity, s.h, dtype) if config.policy != "none" else \
        kc.init_cache(1, s.k, capacity, s.h, dtype)
    return kc.append(c, k, v, pos)


def make_step(s: Shape, config: KVCompressionConfig, budget: int, variant: str, select_m: int,
              scheduled: bool = False):
    def layer(cache, w, x, pos):
        b = x.shape[0]
        q = (x @ w["wq"]).reshape(b, 1, s.n, s.h)
        k = (x @ w["wk"]).reshape(b, 1, s.k, s.h)
        v = (x @ w["wv"]).reshape(b, 1, s.k, s.h)
        if config.quant != "none":
            out, cache = kq.quantized_step(cache, config, q, k, v, pos, budget=budget)
        elif config.policy != "none":
            out, cache = kp.step(cache, config, q, k, v, pos, budget=budget, room=not scheduled)
        elif variant == "select":  # (cache, block index): the index is refreshed, never rebuilt, per step
            cache, index = cache
            start = cache.length
            cache = kc.append(cache, k, v, pos)
            index = qs.refresh_index(index, cache, start, 1)
            out = qs.attend_selected(cache, q, pos, block=512, top_m=select_m, centroids=True, index=index)
            cache = (cache, index)
        else:
            cache = kc.append(cache, k, v, pos)
            out = kc.attend(cache, q, pos)
        return cache, x + out.reshape(b, 1, s.n * s.h) @ w["wo"]

    def step(caches, weights, x, pos):
        new = []
        for cache, w in zip(caches, weights):
            cache, x = layer(cache, w, x, pos)
            new.append(cache)
        return new, x

    return jax.jit(step, donate_argnums=(0,))


def run_one(s: Shape, context: int, variant: str, args, weights, out) -> None:
    dtype = jnp.bfloat16
    config = config_for(variant, args.ratio, args.slack, args.budget)
    steps = args.steps
    # Capacities are rounded up to --align slots: XLA:GPU splits the long contraction of the value product
    # (split-K) and pads the whole V cache to a multiple of the split when C is not one, a full copy of V per
    # step (seen in the optimised H100 HLO of v3). A compressed cache keeps its slack (compression every
    # `slack` steps), so the rounding goes to the budget, which each row records next to the requested one.
    requested = config.budget_for(context)
    if config.policy == "none":
        budget, tokens, capacity = context, context, _round_up(context + steps + 1, args.align)
    else:
        capacity = _round_up(requested + args.slack, args.align)
        capacity = _round_up(capacity, config.quant_group) if config.quant != "none" else capacity
        budget = tokens = capacity - args.slack
    keys = jax.random.split(jax.random.PRNGKey(context), s.layers)
    caches = [filled_cache(keys[i], s, capacity, tokens, context, dtype, config,
                           variant) for i in range(s.layers)]
    if variant == "select":
        caches = [(c, qs.build_index(c, 512)) for c in caches]
    cache_bytes = sum(kc.nbytes(c) for c in caches)
    # --scheduled: no cond in the step; the host compresses every `slack` steps (a separate jitted call,
    # timed).
    scheduled = args.scheduled and config.policy != "none" and config.quant == "none"
    step = make_step(s, config, budget, variant, args.select_m, scheduled)
    squeeze = jax.jit(lambda cs: [kp.compress(c, config, budget) for c in cs], donate_argnums=(0,))
    if scheduled:
        caches = squeeze(caches)  # compile + warm up (the filled caches already hold `budget` tokens)
    length = tokens
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 1, s.d), dtype)
    pos0 = jnp.full((1, 1), context, jnp.int32)
    compiled = step.lower(caches, weights, x, pos0).compile()
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    if args.dump_hlo and variant in args.dump_hlo_variants and context == max(args.contexts):
        # The optimised step, to check that a decode step reads each cache once (no copies / converts of it).
        with open(os.path.join(args.dump_hlo, f"kvcache_step_{variant.replace('+', '_')}_{context}.hlo.txt"),
                  "w") as f:
            f.write(compiled.as_text())
    caches, x = step(caches, weights, x, pos0)  # compile + warm up
    length += 1
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    for i in range(1, steps):
        if scheduled and length + 1 > capacity:
            caches, length = squeeze(caches), budget
        caches, x = step(caches, weights, x, jnp.full((1, 1), context + i, jnp.int32))
        length += 1
    jax.block_until_ready(x)
    ms = (time.perf_counter() - t0) * 1e3 / (steps - 1)
    stats = jax.devices()[0].memory_stats() or {}
    live = stats.get("bytes_in_use")
    row = dict(bench="kvcache_decode", **environment(), layers=s.layers, d=s.d, n_heads=s.n, kv_heads=s.k,
               head_dim=s.h, context=context, variant=variant,
               ratio=None if config.policy == "none" else config.ratio,
               budget=budget, requested_budget=requested, capacity=capacity, slack=args.slack,
               room="scheduled" if scheduled else "cond", steps=steps - 1, ms_per_step=round(ms, 4),
               cache_bytes=cache_bytes, step_temp_bytes=temp, live_bytes=live,
               peak_est_bytes=None if live is None or temp is None else live + temp,
               process_peak_bytes=stats.get("peak_bytes_in_use"))
    if variant == "select":
        row["select"] = {"block": 512, "top_m": args.select_m, "centroids": True}
    emit(row, out)
    del caches


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def environment() -> dict:
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version()}


def emit(row: dict, out) -> None:
    print(json.dumps(row), flush=True)
    if out is not None:
        out.write(json.dumps(row) + "\n")
        out.flush()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072, 524288, 1048576])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--budget", type=int, default=None,
                   help="absolute budget (slots per layer) for the compressed variants instead of --ratio")
    p.add_argument("--slack", type=int, default=32, help="decode steps between compressions")
    p.add_argument("--steps", type=int, default=65)
    p.add_argument("--scheduled", action="store_true",
                   help="compressed float caches: no cond in the step, the host "
                        "compresses every `slack` steps")
    p.add_argument("--align", type=int, default=1024, help="round cache capacities up to a multiple of this")
    p.add_argument("--select-m", type=int, default=16, help="regions of 512 slots attended by 'select'")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=1e9, help="seconds; stop starting new rows after this")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with toy shapes")
    p.add_argument("--dump-hlo", default=None,
                   help="folder: write the optimised decode step at the largest context")
    p.add_argument("--dump-hlo-variants", nargs="+", default=["none", "h2o"], choices=VARIANTS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    s = Shape(layers=args.layers)
    if args.tiny:
        s = Shape(d=64, n=4, k=2, h=16, layers=2)
        args.contexts, args.steps, args.select_m, args.align = [1024, 4096], 9, 2, 64
    weights = init_weights(jax.random.PRNGKey(0), s, jnp.bfloat16)
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    start = time.perf_counter()
    for context in args.contexts:
        for variant in args.variants:
            if time.perf_counter() - start > args.time_limit:
                print(f"time limit reached; skipped S={context} {variant}", file=sys.stderr)
                continue
            try:
                run_one(s, context, variant, args, weights, out)
            except Exception as e:  # noqa: BLE001 - an OOM at 1M must not lose the rows already measured
                emit(dict(bench="kvcache_decode", **environment(), context=context, variant=variant,
                          error=f"{type(e).__name__}: {str(e)[:300]}"), out)


if __name__ == "__main__":
    main()
