"""Benchmark ring attention: per-device memory and step time vs ring size and sequence length (JSON lines).

Each row: environment, mode (``dense`` ring / ``ms`` ring, or the single-device ``plain`` op they replace),
ring size, global and local length, strategy, layout, median ms over ``--reps`` runs after ``--warmup``, and
per-device bytes from the compiled memory analysis (temp + arguments + outputs). Examples::

    # CPU: 8 host devices, memory and time vs ring size at fixed T
    python experiments/benchmarks/bench_ring.py --cpu-devices 8 --devices 1 2 4 8 --lengths 4096 \
        --modes dense ms
    # one GPU: the ring code path at ring size 1 against the plain kernels
    python experiments/benchmarks/bench_ring.py --devices 1 --lengths 32768 \
        --modes dense plain_dense ms plain_ms --grad
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="force this many CPU host devices (before jax starts)")
    p.add_argument("--devices", type=int, nargs="+", default=[1], help="ring sizes to measure")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096], help="global sequence lengths T")
    p.add_argument("--modes", nargs="+", default=["dense", "ms"],
                   choices=["dense", "ms", "plain_dense", "plain_ms"],
                   help="plain_*: the single-device op the ring replaces (dense-plan kernel / ms_attention)")
    p.add_argument("--strategy", default="ring", choices=["ring", "allgather"])
    p.add_argument("--layout", default=None, choices=["contiguous", "zigzag"],
                   help="default: zigzag for dense, contiguous for ms")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=9)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--grad", action="store_true", help="time forward+backward instead of forward")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="JSONL file to append to (also printed)")
    return p.parse_args(argv)


def build(args, mode: str, n: int, t: int):
    """Returns (jitted fn, inputs) for one measurement."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from selmerge_jax.attention import MSAttentionConfig, ms_attention
    from selmerge_jax.kernels.block_sparse_attention import block_sparse_attention, dense_causal_plan
    from selmerge_jax.sharding.ring import ring_attention
    from selmerge_jax.sharding.ring_ms import ring_ms_attention

    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shapes = [(args.batch, t, args.heads, args.head_dim)] + [(args.batch, t, args.kv_heads,
                                                              args.head_dim)] * 2
    q, k, v = (jax.random.normal(kk, s, dtype) for kk, s in zip(keys, shapes))
    config = MSAttentionConfig(block_size=args.block_size, top_k=args.top_k, selection_heads="kv",
                               selection_source="previous")
    if mode == "plain_dense":
        plan = dense_causal_plan(args.batch, args.kv_heads, t, args.block_size)
        attn = lambda a, b, c: block_sparse_attention(a, b, c, plan)
    elif mode == "plain_ms":
        attn = lambda a, b, c: ms_attention(a, b, c, config)
    else:
        layout = args.layout or ("zigzag" if mode == "dense" else "contiguous")
        mesh = jax.sharding.Mesh(jax.devices()[:n], ("seq",), axis_types=(AxisType.Auto,))
        if mode == "dense":
            inner = lambda a, b, c: ring_attention(a, b, c, axis_name="seq", layout=layout,
                                                   strategy=args.strategy, block_size=args.block_size)
        else:
            inner = lambda a, b, c: ring_ms_attention(a, b, c, config, axis_name="seq", layout=layout,
                                                      strategy=args.strategy)
        spec = P(None, "seq")
        attn = jax.shard_map(inner, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    if args.grad:
        fn = jax.jit(jax.grad(lambda a, b, c: attn(a, b, c).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    else:
        fn = jax.jit(attn)
    return fn, (q, k, v)


def measure(args, mode: str, n: int, t: int) -> dict:
    import jax

    fn, inputs = build(args, mode, n, t)
    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_device = (None if mem is None
                  else mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "compile_s": round(compile_s, 2), "per_device_bytes": per_device}


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    import jax

    dev = jax.devices()[0]
    env = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
           "python": platform.python_version(), "device_count": jax.device_count()}
    for t in args.lengths:
        for mode in args.modes:
            for n in ([1] if mode.startswith("plain") else args.devices):
                row = {**env, "mode": mode, "ring_size": n, "T": t, "T_local": t // n,
                       "strategy": args.strategy,
                       "layout": args.layout, "grad": args.grad, "dtype": args.dtype, "B": args.batch,
                       "N": args.heads, "K": args.kv_heads, "H": args.head_dim, "W": args.block_size,
                       "top_k": args.top_k}
                try:
                    row.update(measure(args, mode, n, t))
                # one failed shape (OOM, lowering) must not lose the rest
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:  # appended per row: a killed run keeps what it measured
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
