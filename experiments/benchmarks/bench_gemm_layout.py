"""How fast XLA's GEMMs run for a layer's projections, forward and backward, by weight layout.

A kernel trace of the 7B LoRA step (results R50) shows the backward's input-gradient GEMMs
(``dY @ W^T``) running at ~710-730 TF/s while the forward's (``x @ W``) run at ~800-815 on the same shapes.
This times, for each projection shape of a Llama layer, the four ways a weight can meet its activation:
``x @ W`` with ``W [in, out]`` (the model's layout) and with ``W`` stored ``[out, in]`` (PyTorch's layout, so
``x @ W.T``), and the backward's ``dY @ W.T`` and ``dY @ W`` for the same two storages. One JSON line per
shape and variant: median over ``--reps`` of the mean of 10 back-to-back calls, TF/s, the device and versions,
and whether the compiled program holds a transpose or copy (an optimization barrier fixes no memory layout, so
XLA's layout assignment could still make the in-program transpose free).

    python experiments/benchmarks/bench_gemm_layout.py --tokens 32768 --out gemm.jsonl
"""

import argparse
import json
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

# (name, in, out) of the Llama-2-7B layer's projections (q/k/v/o share a shape)
SHAPES = (("qkvo", 4096, 4096), ("gate_up", 4096, 11008), ("down", 11008, 4096))


def _variants(t: int, d_in: int, d_out: int):
    """``name -> (fn, args)``: forward and backward products for both weight storages."""
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (t, d_in), jnp.bfloat16)
    dy = jax.random.normal(k2, (t, d_out), jnp.bfloat16)
    w = jax.random.normal(k3, (d_in, d_out), jnp.bfloat16) * 0.02
    w_t = jnp.asarray(w.T)  # a physically transposed copy: [out, in]
    return {
        "fwd_w_in_out": (lambda a, b: a @ b, (x, w)),
        "fwd_w_out_in": (lambda a, b: a @ b.T, (x, w_t)),
        "bwd_w_in_out": (lambda a, b: a @ b.T, (dy, w)),
        "bwd_w_out_in": (lambda a, b: a @ b, (dy, w_t)),
        # W [in, out] transposed inside the program behind an optimization barrier (so XLA cannot fold the
        # transpose into the GEMM's operand order): the copy plus the [out, in] GEMMs, as a model could run
        "transpose": (lambda b: jax.lax.optimization_barrier(b.T), (w,)),
        "fwd_w_transposed_in_jit": (lambda a, b: a @ jax.lax.optimization_barrier(b.T).T, (x, w)),
        "bwd_w_transposed_in_jit": (lambda a, b: a @ jax.lax.optimization_barrier(b.T), (dy, w)),
    }


def _time(fn, args, reps: int, warmup: int) -> tuple[float, bool]:
    """(median seconds per call, whether the compiled program transposes or copies anything besides the
    GEMM itself), from one compilation."""
    f = jax.jit(fn).lower(*args).compile()
    moves_data = bool(re.search(r"=\s*\S+\s+(transpose|copy)\(", f.as_text()))  # an instruction's opcode
    for _ in range(warmup):
        f(*args).block_until_ready()
    times = []
    for _ in range(reps):  # 10 calls queued back to back, so the host's dispatch hides behind the device
        start = time.perf_counter()
        for _ in range(9):
            f(*args)
        f(*args).block_until_ready()
        times.append((time.perf_counter() - start) / 10)
    return statistics.median(times), moves_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="-")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.reps < 1 or args.warmup < 0:
        ap.error(f"--tokens and --reps must be >= 1 and --warmup >= 0, got {args.tokens}, {args.reps}, "
                 f"{args.warmup}")
    dev = jax.devices()[0]
    rows = []
    for name, d_in, d_out in SHAPES:
        flops = 2 * args.tokens * d_in * d_out
        for variant, (fn, fargs) in _variants(args.tokens, d_in, d_out).items():
            s, moves_data = _time(fn, fargs, args.reps, args.warmup)
            rows.append({"kind": "gemm_layout", "shape": name, "tokens": args.tokens, "d_in": d_in,
                         "d_out": d_out, "variant": variant, "ms": round(s * 1e3, 4),
                         "tflops": None if variant == "transpose" else round(flops / s / 1e12, 1),
                         "moves_data": moves_data, "device": dev.device_kind,
                         "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", jax.__version__)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.out != "-":
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
