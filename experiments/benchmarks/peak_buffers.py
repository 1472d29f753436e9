"""What XLA keeps alive at a compiled program's peak, by source line: reads an ``--xla_dump_to`` folder.

XLA's dump of a module holds its optimized HLO (``*after_optimizations.txt``) and, per module, a live-range
report whose "Live ranges at <t> (peak)" section lists every buffer alive at the peak. This joins the two: per
buffer its bytes, the HLO instruction's shape and op, and the JAX op name and Python source line that made it
(from the HLO metadata and its stack-frame tables), then groups the bytes by source line. Used to find what a
program holds that the memory planner (``models.memory``) does not expect.

  XLA_FLAGS=--xla_dump_to=/tmp/dump python experiments/benchmarks/prefill_plans.py /tmp/plans.jsonl 524288
  python experiments/benchmarks/peak_buffers.py /tmp/dump --module prefill --top 40
"""

import argparse
import collections
import glob
import json
import os
import re


def _module_files(dump: str, module: str) -> tuple[str, str]:
    ranges = sorted(glob.glob(os.path.join(dump, f"*{module}*after_optimizations-live-range.txt")),
                    key=os.path.getsize)
    if not ranges:
        raise SystemExit(f"no *{module}*after_optimizations-live-range.txt under {dump}")
    live = ranges[-1]  # the largest module of that name
    return live, live.replace("-live-range.txt", ".txt")


def peak_buffers(live_range_file: str) -> tuple[int, list[tuple[str, int]]]:
    """(peak time, [(buffer name, bytes)]) from the report's "Live ranges at ... (peak)" section."""
    out, at, inside = [], -1, False
    with open(live_range_file) as f:
        lines = f.read().splitlines()
    for line in lines:
        m = re.match(r"\s*Live ranges at (\d+) \(peak\):", line)
        if m:
            at, inside = int(m.group(1)), True
            continue
        if inside:
            m = re.match(r"\s+(\S+?)\{[\d,]*\}: (\d+) bytes", line)
            if not m:
                break
            out.append((m.group(1), int(m.group(2))))
    return at, out


def _frames(hlo: str) -> dict[int, str]:
    """stack_frame_id -> 'file:line (function)' from the module's FileNames/FunctionNames/... tables."""
    tables: dict[str, list[str]] = collections.defaultdict(list)
    section = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and re.match(r"^\d+ ", line):
            tables[section].append(line.split(" ", 1)[1])
        elif section and line and not line[0].isdigit():
            section = None
    files = [s.strip('"') for s in tables["FileNames"]]
    funcs = [s.strip('"') for s in tables["FunctionNames"]]
    locs = []
    for s in tables["FileLocations"]:
        kv = dict(re.findall(r"(\w+)=(\d+)", s))
        locs.append((int(kv.get("file_name_id", 1)) - 1, int(kv.get("function_name_id", 1)) - 1,
                     int(kv.get("line", 0))))
    # The dumps' parent_frame_id does not chain reliably: each instruction is named by its innermost frame.
    frames: dict[int, str] = {}
    for i, s in enumerate(tables["StackFrames"], start=1):
        kv = dict(re.findall(r"(\w+)=(\d+)", s))
        f, fn, ln = locs[int(kv.get("file_location_id", 1)) - 1]
        path = re.sub(r"^.*?/(selmerge_jax|kernels|experiments|jax|flax)/", r"\1/", files[f])
        frames[i] = f"{path}:{ln} ({funcs[fn]})"
    return frames


def instructions(hlo: str) -> dict[str, dict]:
    """name -> {shape, op, op_name, frame} for every instruction of the optimized module."""
    frames = _frames(hlo)
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        name, rest = m.group(1), line[m.end():]
        op_m = re.search(r"(?:^|[\s}\)])([a-z][\w\-]*)\(", rest)  # the op follows the (tuple) shape
        shape, op = (rest[:op_m.start(1)].strip(), op_m.group(1)) if op_m else (rest[:40], "")
        op_name = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        out.setdefault(name, {"shape": shape[:80], "op": op,
                              "op_name": op_name.group(1)[-90:] if op_name else "",
                              "frame": frames.get(int(frame.group(1)), "") if frame else ""})
    return out


def report(dump: str, module: str, top: int) -> dict:
    live_file, hlo_file = _module_files(dump, module)
    at, live = peak_buffers(live_file)
    with open(hlo_file) as f:
        info = instructions(f.read())
    rows = []
    for name, size in sorted(live, key=lambda x: -x[1]):
        i = info.get(name, {})
        rows.append({"buffer": name, "mib": round(size / 2**20, 2), **i})
    by_line: dict[str, float] = collections.Counter()
    for r in rows:
        by_line[r.get("frame") or r.get("op_name") or r["buffer"]] += r["mib"]
    return {"module": os.path.basename(hlo_file), "peak_at": at,
            "peak_mib": round(sum(s for _, s in live) / 2**20, 1),
            "by_source": [{"where": k, "mib": round(v, 1)} for k, v in by_line.most_common(top)],
            "buffers": rows[:top]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dump")
    p.add_argument("--module", default="", help="substring of the module name (the largest match is read)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    print(json.dumps(report(args.dump, args.module, args.top), indent=1))


if __name__ == "__main__":
    main()
