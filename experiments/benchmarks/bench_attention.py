"""Benchmark block-sparse attention: Pallas kernel vs the XLA reference vs dense cuDNN, and the MS layer.

Every measurement is one JSON line (device, versions, spec, implementation, mode, median ms over ``--reps``
runs after ``--warmup`` runs with ``block_until_ready``, useful TFLOP/s counting the attended blocks only,
peak device memory). Examples::

    python experiments/benchmarks/bench_attention.py --specs h100_64k h100_128k \
        --out experiments/results/attention_h100/run.jsonl
    python experiments/benchmarks/bench_attention.py --check gpu_check_8k          # kernel vs reference
    python experiments/benchmarks/bench_attention.py --specs --ms-layer h100_1m --dense-lens 131072 262144
    python experiments/benchmarks/bench_attention.py --check gpu_check_8k --check-impls pallas_mosaic_gpu \
        --specs h100_64k --impls pallas_mosaic_gpu pallas_triton --mosaic-sweep '[{}, {"stages": 3}]'
    python experiments/benchmarks/bench_attention.py --specs h100_64k h100_128k --peer-flex  # + FlexAttention

``--peer-flex`` runs PyTorch's FlexAttention on each spec's own plan (``peer_flex_attention.py``, a child
process started before JAX takes the GPU), and ``kind: ratio`` rows divide the project's useful TF/s by
cuDNN's and FlexAttention's from the same invocation. ``--ms-layer`` adds a ``kind: selection_share`` row per
spec: selection's share of the whole op's forward (selection + kernel), each jitted alone, median of
``--reps``; ``--layer-modes inside`` measures it inside the op (``kind: selection_share_inside``).

Shapes come from ``selmerge_jax.kernels.block_sparse_attention.specs`` (the tests use the same names).
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import jaxlib

from selmerge_jax.kernels.block_sparse_attention import (
    block_sparse_attention_reference,
    register_implementation,
)
from selmerge_jax.kernels.block_sparse_attention.pallas_triton import (
    TritonTiling,
    block_sparse_attention_triton,
)
from selmerge_jax.kernels.block_sparse_attention.specs import SPECS, get_spec, useful_flops

try:  # Hopper-only backend; its module imports on any jax with Pallas Mosaic GPU
    from selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu import (
        MosaicTiling,
        block_sparse_attention_mosaic_gpu,
    )
except (ImportError, AttributeError):  # pragma: no cover
    MosaicTiling = block_sparse_attention_mosaic_gpu = None

sys.path.insert(0, os.path.dirname(__file__))  # trace_summary, beside this script, wherever it is run from

INTERPRET = False  # --interpret: run the Pallas kernels in the interpreter (CPU smoke runs)
BWD_FACTOR = 3.5  # fwd+bwd FLOPs / fwd FLOPs (backward = 2.5 forward: the usual flash-attention convention)


def environment() -> dict:
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "python": platform.python_version()}


def emit(row: dict, out) -> None:
    print(json.dumps(row), flush=True)
    if out is not sys.stdout:
        out.write(json.dumps(row) + "\n")
        out.flush()


def peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_fn(fn, args, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def compiled_bytes(fn, args):
    """Temp + argument + output bytes XLA plans for ``fn`` (a per-function peak, unlike the process peak)."""
    try:
        mem = fn.lower(*args).compile().memory_analysis()
        return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    except Exception:  # noqa: BLE001 (not every backend reports memory)
        return None


def fwd_and_fwdbwd(attn):
    """Jitted forward and forward+backward (vjp with a fixed cotangent) of ``attn(q, k, v)``."""
    fwd = jax.jit(attn)

    def fb(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)

    return fwd, jax.jit(fb)


def device_times(fn, args, reps: int) -> list[float]:
    """Device time (ms) of each of ``reps`` calls of ``fn``: its kernels under ``jax.profiler``
    (``trace_summary.call_times``), without the host's dispatch and the wait between calls that ``time_fn``'s
    wall clock includes (a larger share of a 4 ms kernel than of cuDNN's 57 ms dense one). ``[]`` where the
    trace has no device kernels (CPU)."""
    from trace_summary import call_times  # beside this script

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        return call_times(trace_dir, reps)


def measure(record, fn, args, flops, reps, warmup, out, device=False):
    """Times ``fn`` by wall clock (median of ``reps``) and, with ``device``, by device time too (median of
    ``reps`` traced calls: ``ms_device``, ``tflops_useful_device``); emits and returns the row."""
    times = time_fn(fn, args, reps, warmup)
    ms = statistics.median(times)
    row = {**record, "ms": round(ms, 4), "ms_min": round(min(times), 4), "reps": reps,
           "tflops_useful": round(flops / ms / 1e9, 1) if flops else None, "flops": flops,
           "compiled_bytes": compiled_bytes(fn, args), "process_peak_bytes": peak_bytes()}
    if device:
        try:
            dev = device_times(fn, args, reps)
        except Exception as e:  # noqa: BLE001 (no trace: keep the wall-clock row, say why)
            dev, row["device_error"] = [], f"{type(e).__name__}: {str(e)[:300]}"
        dev_ms = statistics.median(dev) if dev else None
        row.update({"ms_device": round(dev_ms, 4) if dev_ms else None,
                    "ms_device_min": round(min(dev), 4) if dev else None,
                    "tflops_useful_device": round(flops / dev_ms / 1e9, 1) if dev_ms and flops else None})
    emit(row, out)
    return row


def mosaic_fn(plan, tiling, mosaic_tiling, return_lse=False):
    """Mosaic GPU kernels (``mosaic_tiling``; its ``backward="triton"`` runs the Triton backward with
    ``tiling``)."""
    return lambda q, k, v: block_sparse_attention_mosaic_gpu(q, k, v, plan, return_lse=return_lse,
                                                             tiling=mosaic_tiling, backward_tiling=tiling,
                                                             interpret=INTERPRET)


def attention_fns(plan, tiling, mosaic_tiling=None):
    """The compared implementations on the same q/k/v (cuDNN is dense causal: it ignores the plan)."""
    return {
        "pallas_triton": lambda q, k, v: block_sparse_attention_triton(q, k, v, plan, tiling=tiling,
                                                                       interpret=INTERPRET),
        "pallas_mosaic_gpu": mosaic_fn(plan, tiling, mosaic_tiling),
        "xla": lambda q, k, v: block_sparse_attention_reference(q, k, v, plan),
        "cudnn_dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                    implementation="cudnn"),
    }


def bench_spec(name, args, tiling, out, mosaic_tiling=None):
    spec = get_spec(name)
    q, k, v, plan, do = jax.jit(spec.make_inputs)(jax.random.PRNGKey(0))
    sparse = useful_flops(plan, spec.q_heads, spec.head_dim)
    dense = 4.0 * spec.batch * spec.q_heads * spec.seq_len ** 2 * spec.head_dim * 0.5
    base = {"kind": "kernel", **environment(), "spec": name, "shape": spec.__dict__,
            "tiling": tiling.__dict__}
    rows = []
    for impl, attn in attention_fns(plan, tiling, mosaic_tiling).items():
        if impl not in args.impls or (impl == "xla" and spec.seq_len > args.max_xla_len):
            continue
        flops = dense if impl == "cudnn_dense" else sparse
        fwd, fb = fwd_and_fwdbwd(attn)
        for mode in args.modes:
            fn, fargs = (fwd, (q, k, v)) if mode == "fwd" else (fb, (q, k, v, do))
            kind = "dense_causal" if impl == "cudnn_dense" else "useful"
            record = {**base, "impl": impl, "mode": mode, "flops_kind": kind}
            if impl == "pallas_mosaic_gpu":
                record["mosaic_tiling"] = (mosaic_tiling or MosaicTiling()).__dict__
            try:
                rows.append(measure(record, fn, fargs, flops * (1 if mode == "fwd" else BWD_FACTOR),
                                    args.reps, args.warmup, out, device=args.device_time))
            except Exception as e:  # noqa: BLE001 (record the failure, keep benchmarking)
                emit({**base, "impl": impl, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:400]}"},
                     out)
    return rows


def run_flex_peer(names, args, out) -> list[dict]:
    """FlexAttention rows of each spec, from ``peer_flex_attention.py`` in a child process (PyTorch holds the
    GPU only while it runs, before JAX takes it)."""
    rows = []
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_flex_attention.py")
    for name in names:
        cmd = [sys.executable, script, "--spec", name, "--modes", *args.modes, "--reps", str(args.reps),
               "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for row in got or [{"kind": "kernel", "impl": "flex_attention", "spec": name,
                            "error": proc.stderr[-1500:]}]:
            emit(row, out)
        rows += got
    return rows


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Per spec, mode and project kernel: its useful TF/s over cuDNN's (dense causal) and FlexAttention's
    (same plan) from the same invocation, with the absolute figures beside the ratios."""
    def key(r):
        return r.get("spec"), r.get("mode")

    by = {(key(r), r["impl"]): r for r in rows if r.get("tflops_useful")}
    out = []
    for (k, impl), r in by.items():
        if impl in ("cudnn_dense", "flex_attention", "xla"):
            continue
        row = {"kind": "ratio", "spec": k[0], "mode": k[1], "impl": impl, "tflops_useful": r["tflops_useful"],
               "ms": r["ms"], "device": r.get("device")}
        if r.get("tflops_useful_device"):
            row.update(tflops_useful_device=r["tflops_useful_device"], ms_device=r["ms_device"])
        for peer in ("cudnn_dense", "flex_attention"):
            other = by.get((k, peer))
            if other:
                row[f"{peer}_tflops"] = other["tflops_useful"]
                row[f"{peer}_ms"] = other["ms"]
                row[f"tflops_vs_{peer}"] = round(r["tflops_useful"] / other["tflops_useful"], 3)
                if r.get("tflops_useful_device") and other.get("tflops_useful_device"):
                    row[f"{peer}_tflops_device"] = other["tflops_useful_device"]
                    row[f"{peer}_ms_device"] = other["ms_device"]
                    row[f"tflops_vs_{peer}_device"] = round(
                        r["tflops_useful_device"] / other["tflops_useful_device"], 3)
        out.append(row)
    return out


def head_major(q, k, v, do, regions):
    """The same problem with each kv head as its own batch row: ``[B, T, K*G, H] -> [B*K, T, G, H]`` (and K/V,
    dO, the plan likewise). Work items, their order and the FLOPs are the kernel's as before; only memory
    changes: a K/V region of one kv head becomes one contiguous ``W x H`` block instead of ``W`` rows ``K*H``
    elements apart."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    rows = lambda x, g: x.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b * kv, t, g, h)
    return (rows(q, n // kv), rows(k, 1), rows(v, 1), rows(do, n // kv),
            regions.reshape(b * kv, 1, *regions.shape[2:]))


def bench_layout_probe(name, args, out, mosaic_tiling):
    """``--layout-probe``: the Mosaic kernels on the spec as given (token-major: ``[B, T, N, H]``) against the
    same problem with each kv head a batch row (``head_major``), A/B/A/B in one process, forward and forward +
    backward (median of ``--sweep-reps`` each; the relayout is outside the timed calls). Whether the kernels'
    strided K/V and Q/dO tiles cost DRAM efficiency: if head-major is faster, a head-major layout in the
    kernels would pay."""
    spec = get_spec(name)
    q, k, v, plan, do = jax.jit(spec.make_inputs)(jax.random.PRNGKey(0))
    flops = useful_flops(plan, spec.q_heads, spec.head_dim)
    layouts = {"token_major": (q, k, v, do, plan.kv_regions),
               "head_major": jax.jit(head_major)(q, k, v, do, plan.kv_regions)}
    base = {"kind": "layout_probe", **environment(), "spec": name,
            "mosaic_tiling": (mosaic_tiling or MosaicTiling()).__dict__}
    for layout in ("token_major", "head_major", "token_major", "head_major"):
        lq, lk, lv, ldo, regions = layouts[layout]
        lplan = dataclasses.replace(plan, kv_regions=regions)
        fwd, fb = fwd_and_fwdbwd(mosaic_fn(lplan, TritonTiling(), mosaic_tiling))
        for mode, fn, fargs, f in (("fwd", fwd, (lq, lk, lv), flops),
                                   ("fwdbwd", fb, (lq, lk, lv, ldo), BWD_FACTOR * flops)):
            ms = statistics.median(time_fn(fn, fargs, args.sweep_reps, 1))
            emit({**base, "layout": layout, "mode": mode, "ms": round(ms, 4),
                  "tflops_useful": round(f / ms / 1e9, 1)}, out)


def bench_mosaic_parts(name, args, out, mosaic_tiling):
    """Times the Mosaic kernels' parts separately: forward, backward preparation (XLA: delta, or with
    ``delta_in_dq`` only the LSE cotangent, LSE rescale, compacted and transposed plans), then the dK/dV pass
    with dQ fused in, or the dQ pass (with ``delta_in_dq`` also delta) and the dK/dV pass
    (``fused_dq=False``). Matmul FLOPs are actual, not useful, per pass."""
    from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu as mg
    from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu_bwd as mb

    spec = get_spec(name)
    q, k, v, plan, do = jax.jit(spec.make_inputs)(jax.random.PRNGKey(0))
    st = mg.make_static(q, k, plan, None, mosaic_tiling or MosaicTiling(), INTERPRET)
    regions = plan.kv_regions.astype(jnp.int32)
    fwd_flops = useful_flops(plan, spec.q_heads, spec.head_dim)
    fwd = jax.jit(lambda q, k, v, regions: mg._attend(q, k, v, regions, st, None))
    out_, lse = fwd(q, k, v, regions)
    prep = jax.jit(lambda out_, lse, do, regions: mb.prepare(st, (q, k, v, regions, out_, lse),
                                                             (do, jnp.zeros_like(lse))))
    stats, sel, cnt, order, offsets, entries = prep(out_, lse, do, regions)
    parts = {
        "forward": (fwd, (q, k, v, regions), fwd_flops),
        "bwd_prepare": (prep, (out_, lse, do, regions), None),
        "bwd_prepare_stats": (jax.jit(lambda out_, lse, do: mb.prepare(
            st, (q, k, v, regions, out_, lse), (do, jnp.zeros_like(lse)))[0]), (out_, lse, do), None),
        "bwd_prepare_plans": (jax.jit(lambda regions: mb.prepare(
            st, (q, k, v, regions, out_, lse), (do, jnp.zeros_like(lse)))[1:]), (regions,), None),
    }
    dq_args = (q, k, v, do, stats, sel, cnt, out_)
    if st.tiling.delta_in_dq and not st.tiling.fused_dq:  # the dQ pass completes the stats dK/dV reads
        stats = jax.jit(lambda *a: mb.dq_pass(st, *a))(*dq_args)[1]
    kv_args = (q, k, v, do, stats, order, offsets, entries)
    # one pass: S^T, dP^T, dV, dK and dQ (five matmuls per block pair; with dq_exchange the fully masked
    # steps it no longer skips are not counted)
    if st.tiling.fused_dq:
        parts["dkv_dq_pass"] = (jax.jit(lambda *a: mb.dkv_pass(st, *a)), kv_args, 2.5 * fwd_flops)
    else:
        parts["dq_pass"] = (jax.jit(lambda *a: mb.dq_pass(st, *a)), dq_args, 1.5 * fwd_flops)
        parts["dkv_pass"] = (jax.jit(lambda *a: mb.dkv_pass(st, *a)), kv_args, 2.0 * fwd_flops)
    base = {"kind": "mosaic_part", **environment(), "spec": name, "mosaic_tiling": st.tiling.__dict__}
    for part, (fn, fargs, flops) in parts.items():
        measure({**base, "part": part, "flops_kind": "actual"}, fn, fargs, flops, args.reps, args.warmup, out)


def sweep_groups(args) -> list:
    """``[[mode, [overrides, ...]], ...]``: ``--sweep-groups`` if given, else the fwd then the bwd list."""
    if args.sweep_groups:
        groups = json.loads(args.sweep_groups)
    else:
        groups = [["fwd", json.loads(args.sweep_fwd)], ["fwdbwd", json.loads(args.sweep_bwd)]]
    for mode, cands in groups:
        if mode not in ("fwd", "fwdbwd") or not isinstance(cands, list):
            raise ValueError("--sweep-groups entries must be [\"fwd\"|\"fwdbwd\", "
                             f"[overrides...]], got {mode!r}")
    return groups


def sweep_tiling(name, args, tiling, out) -> TritonTiling:
    """Times candidate tilings on one spec, group after group (each group's best is kept for the next)."""
    spec = get_spec(name)
    q, k, v, plan, do = jax.jit(spec.make_inputs)(jax.random.PRNGKey(0))
    best = dict(tiling.__dict__)
    for mode, cands in sweep_groups(args):
        scores = []
        for cand in cands:
            t = TritonTiling(**{**best, **cand})
            attn = lambda q, k, v, t=t: block_sparse_attention_triton(q, k, v, plan, tiling=t,
                                                                      interpret=INTERPRET)
            fwd, fb = fwd_and_fwdbwd(attn)
            fn, fargs = (fwd, (q, k, v)) if mode == "fwd" else (fb, (q, k, v, do))
            try:
                ms = statistics.median(time_fn(fn, fargs, args.sweep_reps, 1))
            except Exception as e:  # noqa: BLE001 (e.g. shared memory exceeded: skip the candidate)
                emit({"kind": "sweep", "spec": name, "mode": mode, "tiling": t.__dict__,
                      "error": str(e)[:200]}, out)
                continue
            emit({"kind": "sweep", **environment(), "spec": name, "mode": mode, "tiling": t.__dict__,
                  "ms": round(ms, 4)}, out)
            scores.append((ms, cand))
        if scores:
            best.update(min(scores, key=lambda s: s[0])[1])
    return TritonTiling(**best)


def sweep_mosaic(name, args, tiling, out):
    """Times candidate ``MosaicTiling`` overrides on one spec (``--mosaic-sweep-mode``); returns the
    fastest."""
    spec = get_spec(name)
    q, k, v, plan, do = jax.jit(spec.make_inputs)(jax.random.PRNGKey(0))
    base = json.loads(args.mosaic_tiling)
    mode = args.mosaic_sweep_mode
    scores = []
    for cand in json.loads(args.mosaic_sweep):
        mt = MosaicTiling(**{**base, **cand})
        fwd, fb = fwd_and_fwdbwd(mosaic_fn(plan, tiling, mt))
        fn, fargs = (fwd, (q, k, v)) if mode == "fwd" else (fb, (q, k, v, do))
        try:
            ms = statistics.median(time_fn(fn, fargs, args.sweep_reps, 1))
        except Exception as e:  # noqa: BLE001 (e.g. shared memory exceeded: skip the candidate)
            emit({"kind": "mosaic_sweep", "spec": name, "mosaic_tiling": mt.__dict__,
                  "error": f"{type(e).__name__}: {str(e)[:300]}"}, out)
            continue
        emit({"kind": "mosaic_sweep", **environment(), "spec": name, "mode": mode,
              "mosaic_tiling": mt.__dict__,
              "ms": round(ms, 4)}, out)
        scores.append((ms, mt))
    return min(scores, key=lambda s: s[0])[1] if scores else MosaicTiling(**base)


def check_attn(impl, plan, tiling, mosaic_tiling):
    if impl == "pallas_mosaic_gpu":
        return mosaic_fn(plan, tiling, mosaic_tiling, return_lse=True)
    if impl != "pallas_triton":
        raise ValueError(f"--check-impls: {impl!r} is not a kernel (pallas_triton, pallas_mosaic_gpu)")
    return lambda q, k, v: block_sparse_attention_triton(q, k, v, plan, return_lse=True, tiling=tiling,
                                                         interpret=INTERPRET)


def check_spec(name, tiling, out, impl="pallas_triton", mosaic_tiling=None):
    """Kernel vs reference (forward, dq, dk, dv, lse) on one spec: max abs error relative to max |ref|."""
    spec = get_spec(name)
    q, k, v, plan, do = jax.jit(spec.make_inputs)(jax.random.PRNGKey(1))

    def run(attn):
        def f(q, k, v):
            (out, lse), vjp = jax.vjp(lambda *a: attn(*a), q, k, v)
            return out, lse, vjp((do, jnp.zeros_like(lse)))
        return jax.jit(f)(q, k, v)

    ref = run(lambda q, k, v: block_sparse_attention_reference(q, k, v, plan, return_lse=True))
    ker = run(check_attn(impl, plan, tiling, mosaic_tiling))
    again = run(check_attn(impl, plan, tiling, mosaic_tiling))
    names = ("out", "lse", "dq", "dk", "dv")
    flat = lambda t: (t[0], t[1], *t[2])
    errs = {}
    for n, a, b in zip(names, flat(ref), flat(ker)):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        errs[n] = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-6))
    same = all(bool(jnp.array_equal(x, y)) for x, y in zip(flat(ker), flat(again)))
    nan = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in flat(ker))
    row = {"kind": "check", **environment(), "spec": name, "impl": impl, "rel_err": errs,
           "bitwise_deterministic": same, "nan": nan, "tiling": tiling.__dict__}
    if impl == "pallas_mosaic_gpu":
        row["mosaic_tiling"] = (mosaic_tiling or MosaicTiling()).__dict__
    emit(row, out)


def trace_kernels(fn, args, path: str) -> dict:
    """One traced call of ``fn``: every device kernel kept in ``path`` (``trace_summary.dump_kernels``) and
    the call's kernel time by kind (``trace_summary.summarize``), to say where a whole op's time goes beyond
    the kernels timed apart."""
    from trace_summary import dump_kernels, summarize  # beside this script

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        try:
            dump_kernels(trace_dir, path)
        except ValueError as e:  # no device kernel stream (the CPU): say so, keep the timed rows
            return {"trace_error": str(e)[:300]}
        summary = summarize(trace_dir, top=12)
    return {k: summary.get(k) for k in ("kernel_ms", "span_ms", "launches", "by_kind_ms", "top_kernels")}


def bench_ms_layer(name, args, tiling, out, mosaic_tiling=None):
    """Selection + kernel at the spec's length (MS attention as the layer runs it), fwd and fwd+bwd."""
    from selmerge_jax.attention import MSAttentionConfig, ms_attention, select_regions

    spec = get_spec(name)
    cfg = MSAttentionConfig(block_size=spec.block_size, top_k=spec.selected + 1, merge=1,
                            selection_heads="kv",
                            selection_source="previous", selection_batch=args.selection_batch)
    q, k, v, _, do = jax.jit(spec.make_inputs)(jax.random.PRNGKey(2))
    base = {"kind": "ms_layer", **environment(), "spec": name, "shape": spec.__dict__, "config": cfg.__dict__,
            "tiling": tiling.__dict__}
    plan = jax.jit(lambda q, k: select_regions(q, k, cfg))(q, k)
    flops = useful_flops(plan, spec.q_heads, spec.head_dim)
    impl, label = args.layer_impl, f"ms_attention+{args.layer_impl}"
    if args.layer_impl == "pallas_triton":
        # The layer dispatches by name: register the (possibly tuned) tiling under its own name for this run.
        register_implementation("pallas_triton_bench", functools.partial(
            block_sparse_attention_triton, tiling=tiling, interpret=INTERPRET))
        impl = "pallas_triton_bench"
    elif args.layer_impl == "pallas_mosaic_gpu":  # the Mosaic kernels with --mosaic-tiling
        register_implementation("pallas_mosaic_gpu_bench", functools.partial(
            block_sparse_attention_mosaic_gpu, tiling=mosaic_tiling, interpret=INTERPRET))
        impl = "pallas_mosaic_gpu_bench"
        base["mosaic_tiling"] = (mosaic_tiling or MosaicTiling()).__dict__
    elif args.layer_impl == "default":  # the library's own order (Mosaic GPU forward first on a GPU)
        impl, label = None, "ms_attention+default"
    attn = lambda q, k, v: ms_attention(q, k, v, cfg, implementation=impl)
    fwd, fb = fwd_and_fwdbwd(attn)
    # What a training step keeps: the gradients only. ``fwdbwd`` also returns the layer output, which must
    # then outlive the backward (8 GiB at 1M), so its peak is not the layer's.
    grads = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
    select = jax.jit(lambda q, k: select_regions(q, k, cfg).kv_regions)
    ms = {}
    for mode, fn, fargs, f in (("selection", select, (q, k), None), ("fwd", fwd, (q, k, v), flops),
                               ("fwdbwd", fb, (q, k, v, do), flops * BWD_FACTOR),
                               ("grads", grads, (q, k, v, do), flops * BWD_FACTOR)):
        if mode in args.layer_modes:
            reps = args.reps if mode == "selection" else max(args.reps // 2, 3)
            ms[mode] = measure({**base, "impl": label, "mode": mode}, fn, fargs, f, reps, 1, out,
                               device=args.device_time)["ms"]
            if args.kernels_to:
                os.makedirs(args.kernels_to, exist_ok=True)
                path = os.path.join(args.kernels_to, f"{name}_{mode}.jsonl.gz")
                emit({"kind": "ms_layer_trace", "spec": name, "impl": label, "mode": mode, "kernels": path,
                      **trace_kernels(fn, fargs, path)}, out)
    if "inside" in args.layer_modes:
        emit({**base, **selection_inside(spec, cfg, impl, label, args.reps)}, out)
    if "selection" in ms and "fwd" in ms:
        emit({"kind": "selection_share", **environment(), "spec": name, "impl": label,
              "selection_ms": ms["selection"], "op_fwd_ms": ms["fwd"],
              "selection_share": round(ms["selection"] / ms["fwd"], 4)}, out)


def selection_inside(spec, cfg, impl, label, reps: int) -> dict:
    """Selection's share measured inside the op: the whole forward (one jitted call, selection inside) against
    the kernel alone on the plan that call builds, on fresh inputs at every repetition (drawn, and the plan
    built, outside the timed calls), so no repetition reuses another's data or plan."""
    from selmerge_jax.attention import ms_attention, select_regions
    from selmerge_jax.kernels.block_sparse_attention import block_sparse_attention

    whole = jax.jit(lambda q, k, v: ms_attention(q, k, v, cfg, implementation=impl))
    kernel = jax.jit(lambda q, k, v, plan: block_sparse_attention(q, k, v, plan, implementation=impl))
    select = jax.jit(lambda q, k: select_regions(q, k, cfg))
    draw = jax.jit(lambda key: spec.make_inputs(key)[:3])
    times = {"whole": [], "kernel": []}
    for i in range(reps + 1):  # the first draw warms both executables up
        q, k, v = jax.block_until_ready(draw(jax.random.PRNGKey(100 + i)))
        plan = jax.block_until_ready(select(q, k))
        for name, fn, fargs in (("whole", whole, (q, k, v)), ("kernel", kernel, (q, k, v, plan))):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*fargs))
            if i:
                times[name].append((time.perf_counter() - t0) * 1e3)
    whole_ms, kernel_ms = (statistics.median(times[n]) for n in ("whole", "kernel"))
    return {"kind": "selection_share_inside", "impl": label, "mode": "fwd", "reps": reps,
            "op_fwd_ms": round(whole_ms, 4), "kernel_fwd_ms": round(kernel_ms, 4),
            "selection_share": round(1.0 - kernel_ms / whole_ms, 4)}


def bench_dense(seq_lens, args, out):
    """Dense cuDNN causal at long lengths (H100 spec heads), with the quadratic extrapolation to 1M."""
    spec = get_spec("h100_64k")
    for t in seq_lens:
        shape_q, shape_k = (1, t, spec.q_heads, spec.head_dim), (1, t, spec.kv_heads, spec.head_dim)
        key = jax.random.PRNGKey(3)
        q = jax.random.normal(key, shape_q, jnp.bfloat16)
        k = jax.random.normal(key, shape_k, jnp.bfloat16)
        v, do = k, q
        attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="cudnn")
        fwd, fb = fwd_and_fwdbwd(attn)
        flops = 4.0 * t * t * spec.q_heads * spec.head_dim * 0.5
        for mode, fn, fargs, f in (("fwd", fwd, (q, k, v), flops),
                                   ("fwdbwd", fb, (q, k, v, do), flops * BWD_FACTOR)):
            row = measure({"kind": "dense", **environment(), "impl": "cudnn_dense", "mode": mode,
                           "seq_len": t,
                           "heads": [spec.q_heads, spec.kv_heads, spec.head_dim]}, fn, fargs, f, 3, 1, out)
            emit({"kind": "dense_extrapolation", "impl": "cudnn_dense", "mode": mode, "from_seq_len": t,
                  "seq_len": 1048576, "ms": round(row["ms"] * (1048576 / t) ** 2, 1)}, out)


IMPLS = ("pallas_triton", "pallas_mosaic_gpu", "xla", "cudnn_dense")
KERNELS = ("pallas_triton", "pallas_mosaic_gpu")
# The options that give the script something to do; without any of them it would exit 0 having done nothing.
WORK = ("specs", "check", "mosaic_parts", "layout_probe", "ms_layer", "dense_lens", "sweep_spec")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    parse.__name__ = f"int >= {low}"  # argparse names the type in its message
    return parse


def _json(kind: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"must be a JSON {kind.__name__}, got {text!r}")
        return text  # the callers parse the text again
    parse.__name__ = f"JSON {kind.__name__}"
    return parse


def parser() -> argparse.ArgumentParser:
    """Every option with its allowed values (spec names from specs.py, implementations, counts >= 1), so a
    typo or an impossible value stops here with the allowed set instead of yielding empty or NaN rows."""
    spec_names = sorted(SPECS)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", nargs="*", default=[], choices=spec_names, metavar="SPEC",
                    help=f"spec names to benchmark; allowed: {', '.join(spec_names)}")
    ap.add_argument("--impls", nargs="+", default=["pallas_triton", "xla", "cudnn_dense"], choices=IMPLS)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--reps", type=_int_at_least(1), default=10, help="timed runs per row (>= 1)")
    ap.add_argument("--warmup", type=_int_at_least(0), default=2)
    ap.add_argument("--max-xla-len", type=_int_at_least(1), default=16384,
                    help="skip the XLA reference above this length")
    ap.add_argument("--check", nargs="*", default=[], choices=spec_names, metavar="SPEC",
                    help="specs to check kernel vs reference on")
    ap.add_argument("--check-impls", nargs="+", default=["pallas_triton"], choices=KERNELS,
                    help="kernels --check checks")
    ap.add_argument("--mosaic-tiling", default="{}", type=_json(dict),
                    help='JSON overrides of MosaicTiling, e.g. \'{"stages": 3}\'')
    ap.add_argument("--mosaic-sweep", default=None, type=_json(list),
                    help="JSON list of MosaicTiling overrides timed on the forward of "
                         "the first --specs entry; "
                         "the fastest is used for the benchmarks")
    ap.add_argument("--mosaic-sweep-mode", default="fwd", choices=["fwd", "fwdbwd"],
                    help="what --mosaic-sweep times (forward, or forward + backward for "
                         "the backward's options)")
    ap.add_argument("--mosaic-parts", nargs="*", default=[], choices=spec_names, metavar="SPEC",
                    help="specs to time the Mosaic forward, backward preparation, dQ "
                         "and dK/dV passes on, apart")
    ap.add_argument("--layout-probe", nargs="*", default=[], choices=spec_names, metavar="SPEC",
                    help="specs to time the Mosaic kernels on token-major against head-major K/V/Q/dO "
                         "(each kv head a batch row), A/B/A/B, --sweep-reps each")
    ap.add_argument("--ms-layer", nargs="*", default=[], choices=spec_names, metavar="SPEC",
                    help="specs to run the full MS layer on")
    ap.add_argument("--layer-impl", default="pallas_triton",
                    choices=["pallas_triton", "pallas_mosaic_gpu", "default", "xla"],
                    help="kernel of --ms-layer: the tuned Triton tiling, the Mosaic kernels with "
                         "--mosaic-tiling, the library's default order, or XLA")
    ap.add_argument("--kernels-to", default=None, metavar="DIR",
                    help="--ms-layer: trace one more call of each mode, keep its kernels in "
                         "DIR/SPEC_MODE.jsonl.gz and emit its kernel time by kind (kind: ms_layer_trace)")
    ap.add_argument("--layer-modes", nargs="+", default=["selection", "fwd", "fwdbwd", "grads"],
                    choices=["selection", "fwd", "fwdbwd", "grads", "inside"],
                    help="inside: selection's share within one jitted forward, fresh inputs each repetition")
    ap.add_argument("--selection-batch", type=_int_at_least(1), default=None,
                    help="query groups a selection step scores (default: the library's score budget)")
    ap.add_argument("--dense-lens", nargs="*", type=_int_at_least(1), default=[])
    ap.add_argument("--tiling", default="{}", type=_json(dict),
                    help='JSON overrides of TritonTiling, e.g. \'{"rows_fwd": 64}\'')
    ap.add_argument("--sweep-spec", default=None, choices=spec_names, metavar="SPEC",
                    help="spec to tune the tiling on before benchmarking")
    ap.add_argument("--sweep-fwd", default="[{}]", type=_json(list),
                    help="JSON list of TritonTiling overrides timed on fwd")
    ap.add_argument("--sweep-bwd", default="[{}]", type=_json(list),
                    help="JSON list of TritonTiling overrides timed on fwd+bwd")
    ap.add_argument("--sweep-groups", default=None, type=_json(list),
                    help='JSON [[mode, [overrides...]], ...] swept in order, e.g. \'[["fwd", '
                         '[{}, {"rows_fwd": 256}]]]\'')
    ap.add_argument("--sweep-reps", type=_int_at_least(1), default=5)
    ap.add_argument("--device-time", action="store_true",
                    help="also time the --specs and --ms-layer rows on the device (their kernels under "
                         "jax.profiler, median per call: ms_device), and give the ratio rows from those "
                         "times too")
    ap.add_argument("--peer-flex", action="store_true",
                    help="also time PyTorch FlexAttention on each --specs plan (peer_flex_attention.py)")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test; slow)")
    ap.add_argument("--out", default="-")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if not any(getattr(args, name) for name in WORK):
        ap.error("nothing to benchmark: give at least one of "
                 + ", ".join("--" + n.replace("_", "-") for n in WORK))
    if args.mosaic_sweep and not args.specs:
        ap.error("--mosaic-sweep times the first --specs entry: give --specs")
    return args


def main(argv=None):
    args = parse_args(argv)
    global INTERPRET
    INTERPRET = args.interpret
    tiling = TritonTiling(**json.loads(args.tiling))
    if args.out == "-":
        run(args, tiling, sys.stdout)
    else:
        with open(args.out, "a") as out:
            run(args, tiling, out)


def checks(names, tiling, out, impls=("pallas_triton",), mosaic_tiling=None):
    for name in names:
        for impl in impls:
            try:
                check_spec(name, tiling, out, impl, mosaic_tiling)
            except Exception as e:  # noqa: BLE001 (a failed check is a result too; the timings still run)
                emit({"kind": "check", **environment(), "spec": name, "impl": impl,
                      "error": f"{type(e).__name__}: {str(e)[:600]}"}, out)


def run(args, tiling, out):
    # FlexAttention first: its process must have the GPU to itself, before this one's JAX takes it.
    peer_rows = run_flex_peer(args.specs, args, out) if args.peer_flex else []
    mosaic_tiling = MosaicTiling(**json.loads(args.mosaic_tiling)) if MosaicTiling else None
    # The starting tilings are checked before anything is timed.
    checks(args.check, tiling, out, args.check_impls, mosaic_tiling)
    if args.mosaic_sweep and args.specs:
        chosen = sweep_mosaic(args.specs[0], args, tiling, out)
        emit({"kind": "chosen_mosaic_tiling", "mosaic_tiling": chosen.__dict__}, out)
        if chosen != mosaic_tiling and "pallas_mosaic_gpu" in args.check_impls:
            checks(args.check, tiling, out, ("pallas_mosaic_gpu",), chosen)
        mosaic_tiling = chosen
    if args.sweep_spec:
        chosen = sweep_tiling(args.sweep_spec, args, tiling, out)
        emit({"kind": "chosen_tiling", "tiling": chosen.__dict__}, out)
        if chosen != tiling:  # the tuned tiling is checked too before its timings
            checks(args.check, chosen, out)
        tiling = chosen
    timed = []
    for name in args.specs:
        timed += bench_spec(name, args, tiling, out, mosaic_tiling)
    for row in ratio_rows(timed + peer_rows):
        emit(row, out)
    for name in args.mosaic_parts:
        bench_mosaic_parts(name, args, out, mosaic_tiling)
    for name in args.layout_probe:
        bench_layout_probe(name, args, out, mosaic_tiling)
    for name in args.ms_layer:
        bench_ms_layer(name, args, tiling, out, mosaic_tiling)
    if args.dense_lens:
        bench_dense(args.dense_lens, args, out)


if __name__ == "__main__":
    main()
