"""experiments/benchmarks/trace_summary.py: the device's kernel streams are summed by kind, host threads are
left out, ``dump_kernels`` writes exactly the device kernels, one JSON line each, and ``phases`` sums such a
file by kind between time bounds."""

import gzip
import json

import pytest
from experiment_scripts import load_script


def _module():
    return load_script("benchmarks/trace_summary.py")


def _trace(tmp_path):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #14"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 3, "args": {"name": "python"}},
    ]
    kernels = [  # (name, start us, duration us, HLO op)
        ("nvjet_sm90_tst_256x128_NNT", 0, 3000, "dot.1"),
        ("anonymous_mosaic_gpu_kernel", 3000, 2000, "command_buffer_30"),
        ("memcpy128", 5000, 125, "command_buffer_30"),
        ("loop_multiply_fusion_3", 5200, 500, "multiply.4"),
    ]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": ts, "dur": d, "args": {"hlo_op": op}}
                     for n, ts, d, op in kernels]
    events.append({"ph": "X", "pid": 2, "tid": 3, "name": "PjitFunction(step)", "ts": 0, "dur": 9000})
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return kernels


def test_summary_counts_device_kernels_by_kind_and_skips_host_threads(tmp_path):
    ts = _module()
    _trace(tmp_path)
    got = ts.summarize(str(tmp_path))
    assert got["streams"] == 1 and got["launches"] == 4
    assert got["by_kind_ms"] == {"matmul": 3.0, "pallas": 2.0, "fusion": 0.5, "copy": 0.12}
    assert got["kernel_ms"] == 5.62  # the host's 9 ms call is not a kernel
    assert got["span_ms"] == 5.7


def test_dump_kernels_writes_one_line_per_device_kernel(tmp_path):
    ts = _module()
    kernels = _trace(tmp_path)
    out = tmp_path / "kernels.jsonl.gz"
    assert ts.dump_kernels(str(tmp_path), str(out)) == len(kernels)
    with gzip.open(out, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["n"], r["ts"], r["dur"], r["op"]) for r in rows] == kernels
    assert {r["tid"] for r in rows} == {7}


def test_phases_sum_a_kernel_dump_by_kind_between_bounds(tmp_path):
    ts = _module()
    _trace(tmp_path)
    out = tmp_path / "kernels.jsonl.gz"
    ts.dump_kernels(str(tmp_path), str(out))
    first, second = ts.phases(str(out), [4.0])  # the matmul and the Mosaic kernel start before 4 ms
    assert first == {"from_ms": 0.0, "to_ms": 4.0, "by_kind_ms": {"matmul": 3.0, "pallas": 2.0},
                     "kernel_ms": 5.0}
    assert second == {"from_ms": 4.0, "to_ms": None, "by_kind_ms": {"fusion": 0.5, "copy": 0.12},
                      "kernel_ms": 0.62}
    # a kernel starting exactly on a bound (the fusion, at 5.2 ms) opens the later window; past the last
    # kernel, windows are empty
    windows = ts.phases(str(out), [4.0, 5.2, 99.0])
    assert [w["kernel_ms"] for w in windows] == [5.0, 0.12, 0.5, 0.0]
    assert windows[1]["by_kind_ms"] == {"copy": 0.12} and windows[2]["by_kind_ms"] == {"fusion": 0.5}
    assert windows[3] == {"from_ms": 99.0, "to_ms": None, "by_kind_ms": {}, "kernel_ms": 0.0}
    for bad in ([2.0, 1.0], [0.0], [-1.0], [float("nan")], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="bounds_ms"):
            ts.phases(str(out), bad)


def test_call_times_split_identical_calls_in_start_order(tmp_path):
    """Four kernels traced as two calls of two kernels: each call's device time is its two kernels' durations
    (the host's 9 ms event is not one); three calls do not divide four kernels, so no split is given, and a
    trace with no device stream gives none either."""
    ts = _module()
    _trace(tmp_path)
    assert ts.call_times(str(tmp_path), 2) == [5.0, 0.625]
    assert ts.call_times(str(tmp_path), 1) == [5.625]
    assert ts.call_times(str(tmp_path), 3) == []
    assert ts.call_times(str(tmp_path), 0) == []
    host_only = tmp_path / "host"
    folder = host_only / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": [{"ph": "X", "pid": 2, "tid": 3, "name": "python", "ts": 0, "dur": 5}]}, f)
    assert ts.call_times(str(host_only), 1) == []


def test_call_times_order_kernels_by_start_not_by_trace_order(tmp_path):
    """Kernels written to the trace out of start order (two streams, say) are grouped by when they started."""
    ts = _module()
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "Stream #8"}}]
    kernels = [(8, 300, 1000), (7, 0, 2000), (8, 100, 4000), (7, 200, 3000)]  # (stream, start, duration)
    events = meta + [{"ph": "X", "pid": 1, "tid": t, "name": "k", "ts": start, "dur": d}
                     for t, start, d in kernels]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert ts.call_times(str(tmp_path), 2) == [6.0, 4.0]
