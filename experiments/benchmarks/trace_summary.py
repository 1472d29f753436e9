"""Where a compiled step's device time goes: run it under ``jax.profiler`` and sum the GPU kernels by kind.

``summarize(trace_dir)`` reads the Perfetto trace that ``jax.profiler.trace(..., create_perfetto_trace=True)``
writes and returns, for the device's kernel streams only (host threads and XLA's per-op summary lines are left
out so nothing is counted twice), the total kernel time, the time by kind (matmul, attention, the project's
Pallas kernels, copies, fusions of elementwise work, ...) and the top kernels by name. ``dump_kernels``
(CLI: ``trace_summary.py TRACE_DIR --kernels-to FILE.jsonl.gz``) keeps the kernels themselves, one per line;
``call_times`` splits a trace of identical calls into each call's device time (``bench_attention.py
--device-time``); ``phases`` (CLI: ``trace_summary.py FILE.jsonl.gz --phases MS ...``) sums such a file by
kind between bounds.
"""

import bisect
import collections
import glob
import gzip
import itertools
import json
import math
import os
import re

# Ordered: the first pattern a kernel name matches decides its kind.
KINDS = (
    ("attention_cudnn", re.compile(r"cudnn|fmha|flash", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|triton_gemm|dot", re.I)),
    ("pallas", re.compile(r"mosaic|pallas|_kernel|attend|block_sparse", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduce", re.compile(r"reduce|scatter|gather|sort|top_?k|select", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|wrapped_|convert|multiply|add", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _trace_file(trace_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir!r}")
    return found[-1]


def _device_threads(events) -> set:
    """(pid, tid) of the GPU's kernel streams: processes named after a device, threads named 'Stream ...'."""
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and re.search(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))}
    threads = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in devices}
    return {key for key, name in threads.items() if re.search(r"stream", name, re.I)}


def _events(trace_dir: str):
    """The newest trace's events and the (pid, tid) of its device kernel streams."""
    with gzip.open(_trace_file(trace_dir), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return events, _device_threads(events)


def _hlo_op(event) -> str:
    args = event.get("args", {})
    return str(args.get("hlo_op") or args.get("long_name") or args.get("tf_op") or "")


def summarize(trace_dir: str, top: int = 25) -> dict:
    events, streams = _events(trace_dir)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_op: dict[tuple, float] = collections.defaultdict(float)  # (kernel, the HLO op it ran for) -> ms
    first, last = float("inf"), float("-inf")
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams:
            first = min(first, float(e.get("ts", 0.0)))
            last = max(last, float(e.get("ts", 0.0)) + float(e.get("dur", 0.0)))
            name = e.get("name", "?")
            entry = by_name[name]
            entry[0] += float(e.get("dur", 0.0)) / 1e3  # us -> ms
            entry[1] += 1
            by_op[(kind_of(name), _hlo_op(e)[:160])] += float(e.get("dur", 0.0)) / 1e3
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in by_name.items():
        by_kind[kind_of(name)] += ms
    total = sum(by_kind.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    if not streams:  # say what the trace held instead, so a renamed stream is seen, not read as zero time
        names = {str(e.get("args", {}).get("name", "")) for e in events if e.get("ph") == "M"}
        return {"kernel_ms": None, "streams": 0, "trace_names": sorted(names)[:40]}
    # span: first kernel start to last kernel end; span >> kernel_ms means the device waited on the host
    return {"kernel_ms": round(total, 2), "streams": len(streams),
            "launches": sum(c for _, c in by_name.values()), "span_ms": round((last - first) / 1e3, 2),
            "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:120], "kind": kind_of(n), "ms": round(ms, 2), "count": c}
                            for n, (ms, c) in ranked],
            # which HLO ops the copies, reductions and unclassified kernels ran for (what to fuse or avoid)
            "top_ops": [{"kind": k, "op": op, "ms": round(ms, 2)}
                        for (k, op), ms in sorted(by_op.items(), key=lambda kv: -kv[1])
                        if k in ("copy", "reduce", "other")][:top],
            "sample_args": _sample_args(events, streams)}


def _sample_args(events, streams) -> dict:
    """The args of one copy kernel event, so the trace's field names are on record."""
    for e in events:
        on_device = e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams
        if on_device and kind_of(e.get("name", "")) == "copy":
            return {k: str(v)[:200] for k, v in e.get("args", {}).items()}
    return {}


def _device_kernels(events, streams):
    """The trace's kernel events on the device's streams (in trace order)."""
    return (e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams)


def dump_kernels(trace_dir: str, out_path: str) -> int:
    """Every kernel of the device's streams as one JSON line (name, HLO op, stream, start and duration in
    microseconds), gzipped: small enough to keep with the results, where the whole trace is not, and enough
    to read the step's timeline kernel by kernel (which kernel ran twice, which copy sits where)."""
    events, streams = _events(trace_dir)
    if not streams:
        raise ValueError(f"no device kernel stream in the trace under {trace_dir!r}")
    count = 0
    with gzip.open(out_path, "wt") as out:
        for e in _device_kernels(events, streams):
            out.write(json.dumps({"n": e.get("name", "")[:100], "op": _hlo_op(e)[:200], "tid": e["tid"],
                                  "ts": e["ts"], "dur": e.get("dur", 0)}) + "\n")
            count += 1
    return count


def call_times(trace_dir: str, calls: int) -> list[float]:
    """Device time (ms) of each of ``calls`` identical calls traced one after another: the device's kernels in
    start order, split into ``calls`` consecutive groups of equal count (a call launches the same kernels
    every time), each group's durations summed. What the host spends dispatching and waiting between calls
    is not in it. ``[]`` when the trace has no device kernel stream (a CPU run) or the kernel count does not
    divide evenly (then the calls were not alike, and no split is trusted)."""
    events, streams = _events(trace_dir)
    kernels = sorted((float(e.get("ts", 0.0)), float(e.get("dur", 0.0)))
                     for e in _device_kernels(events, streams))
    if calls < 1 or not kernels or len(kernels) % calls:
        return []
    per = len(kernels) // calls
    return [sum(d for _, d in kernels[i * per:(i + 1) * per]) / 1e3 for i in range(calls)]


def phases(kernels_path: str, bounds_ms: list[float]) -> list[dict]:
    """Kernel time by kind in consecutive windows of a ``dump_kernels`` file.

    ``bounds_ms`` (milliseconds after the first kernel starts; finite, positive, increasing) cut the timeline
    into ``len(bounds_ms) + 1`` windows. A kernel belongs, whole, to the window its start falls in (one that
    starts exactly on a bound to the later window). Read off a timeline, the bounds split a traced step into
    its phases (each layer's forward, the loss, each layer's backward), so per-layer costs can be stated.

    Returns one dict per window: ``from_ms``, ``to_ms`` (None for the last), ``by_kind_ms`` (``kind_of``
    kinds, largest first) and ``kernel_ms`` (their sum; 0.0 for a window with no kernel).
    """
    finite = all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds_ms)
    if not finite or any(b <= a for a, b in itertools.pairwise(bounds_ms)) or any(b <= 0 for b in bounds_ms):
        raise ValueError(f"bounds_ms must be finite, positive and increasing, got {bounds_ms!r}")
    with gzip.open(kernels_path, "rt") as f:
        kernels = [json.loads(line) for line in f]
    if not kernels:
        raise ValueError(f"no kernels in {kernels_path!r}")
    start = min(k["ts"] for k in kernels)
    edges = [0.0, *bounds_ms, float("inf")]
    out = [{"from_ms": a, "to_ms": None if b == float("inf") else b, "by_kind_ms": collections.Counter()}
           for a, b in itertools.pairwise(edges)]
    for k in kernels:
        at = (k["ts"] - start) / 1e3
        out[bisect.bisect_right(bounds_ms, at)]["by_kind_ms"][kind_of(k["n"])] += k["dur"] / 1e3
    for w in out:
        w["kernel_ms"] = round(float(sum(w["by_kind_ms"].values())), 2)
        ranked = sorted(w["by_kind_ms"].items(), key=lambda kv: -kv[1])
        w["by_kind_ms"] = {kind: round(ms, 2) for kind, ms in ranked}
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Summarize a jax.profiler trace, or dump its kernels.")
    p.add_argument("trace_dir", help="the profiler's trace folder (with --phases: a --kernels-to file)")
    p.add_argument("--kernels-to", default=None, metavar="FILE.jsonl.gz",
                   help="write every device kernel as a JSON line instead of printing the summary")
    p.add_argument("--phases", nargs="+", type=float, default=None, metavar="MS",
                   help="trace_dir is a --kernels-to file: print its kernel time by kind between these "
                        "bounds (ms after the first kernel), one JSON line per window")
    a = p.parse_args()
    if a.phases and a.kernels_to:
        p.error("--phases reads a --kernels-to file; give one of the two")
    if a.phases:
        for window in phases(a.trace_dir, a.phases):
            print(json.dumps(window))
    elif a.kernels_to:
        print(dump_kernels(a.trace_dir, a.kernels_to), "kernels ->", a.kernels_to)
    else:
        print(json.dumps(summarize(a.trace_dir), indent=1))
