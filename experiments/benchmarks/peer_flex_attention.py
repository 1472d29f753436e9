"""The FlexAttention peer of bench_attention.py: PyTorch's FlexAttention on a spec's own block pattern.

The plan is the spec's (``specs.random_plan`` from the PRNG key bench_attention uses), drawn with JAX on the
CPU, so this process never holds the GPU beside JAX and the pattern is bit-identical to the one the project's
kernels are timed on. Each plan row becomes a ``BlockMask`` row: the selected regions as full blocks (no mask
function runs on them) and the group's own block as a partial block under the causal mask, per query head
(a kv-head plan is repeated over its G query heads; ``enable_gqa``). Prints one JSON line per mode: median
ms of ``--reps`` CUDA-event-timed runs after ``--warmup``, useful TF/s with the FLOP count the project's rows
use.

    python experiments/benchmarks/peer_flex_attention.py --spec h100_128k --modes fwd fwdbwd
"""

import argparse
import json
import os
import statistics
import sys

os.environ["JAX_PLATFORMS"] = "cpu"  # JAX only draws the plan; the GPU is PyTorch's

import jax
import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from selmerge_jax.kernels.block_sparse_attention.specs import (
    get_spec,
    random_plan,
    useful_flops,
)

BWD_FACTOR = 3.5  # as bench_attention: forward + backward = 3.5 forwards of matmul FLOPs
PLAN_KEY = 0  # bench_attention.bench_spec draws its inputs from PRNGKey(0); the plan is split #3 of it


def spec_plan(spec):
    """The spec's plan exactly as ``spec.make_inputs(PRNGKey(PLAN_KEY))`` draws it."""
    key = jax.random.split(jax.random.PRNGKey(PLAN_KEY), 5)[3]
    return random_plan(key, spec)


def block_mask_tensors(kv_regions: np.ndarray, q_heads: int):
    """Plan rows ``[B, P, Q, M]`` (``-1`` padded, merge 1, causal) -> FlexAttention's block tensors per query
    head: ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)``.

    Full blocks: the row's valid regions (every key visible). Partial: the group's own block (causal inside).
    FlexAttention wants the index tensors as wide as the key blocks (Q here), valid entries first.
    """
    b, p, q, m = kv_regions.shape
    rows = np.repeat(kv_regions, q_heads // p, axis=1)  # [B, N, Q, M]: query head h reads plan head h // G
    valid = rows >= 0
    order = np.argsort(~valid, axis=-1, kind="stable")  # valid entries first, in plan order
    full_idx = np.zeros((b, q_heads, q, q), np.int32)
    full_idx[..., :m] = np.take_along_axis(np.where(valid, rows, 0), order, -1)
    full_num = valid.sum(-1).astype(np.int32)
    own = np.zeros((b, q_heads, q, q), np.int32)
    own[..., 0] = np.arange(q, dtype=np.int32)
    return np.ones((b, q_heads, q), np.int32), own, full_num, full_idx


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def block_mask(plan, q_heads: int, device: str, exact: bool = False) -> BlockMask:
    """The plan as a ``BlockMask``. Compiled FlexAttention skips unlisted blocks and runs the mask function on
    partial blocks only, so ``causal`` is exact there (what is timed). The unfused path (eager, CPU) ignores
    the block lists and applies the mask function everywhere: ``exact=True`` makes it look the pattern up too.
    """
    if plan.merge != 1 or not plan.causal or not plan.include_local:
        raise ValueError(f"peer_flex_attention: plans with merge=1, causal, local block only; got merge="
                         f"{plan.merge}, causal={plan.causal}, include_local={plan.include_local}")
    tensors = block_mask_tensors(np.asarray(plan.kv_regions), q_heads)
    parts = [torch.as_tensor(a, device=device) for a in tensors]
    w = plan.block_size
    seq = plan.kv_regions.shape[2] * w
    mask_mod = causal
    if exact:
        allowed = torch.as_tensor(pattern(*tensors), device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, h, q_idx // w, kv_idx // w] & (q_idx >= kv_idx)
    return BlockMask.from_kv_blocks(*parts, BLOCK_SIZE=w, mask_mod=mask_mod, seq_lengths=(seq, seq))


def pattern(kv_num, kv_idx, full_num, full_idx) -> np.ndarray:
    """``bool [B, N, Q, Q]``: the key blocks each query block attends, from the block tensors."""
    q = kv_num.shape[-1]
    out = np.zeros((*kv_num.shape, q), bool)
    for num, idx in ((kv_num, kv_idx), (full_num, full_idx)):
        b, h, row, slot = np.nonzero(np.arange(idx.shape[-1]) < num[..., None])
        out[b, h, row, idx[b, h, row, slot]] = True
    return out


def inputs(spec, device: str, dtype):
    """q ``[B, N, T, H]``, k/v ``[B, K, T, H]`` (FlexAttention's head-major layout), output cotangent."""
    g = torch.Generator(device=device).manual_seed(0)
    shape_q = (spec.batch, spec.q_heads, spec.seq_len, spec.head_dim)
    shape_k = (spec.batch, spec.kv_heads, spec.seq_len, spec.head_dim)
    make = lambda s: torch.randn(s, generator=g, device=device, dtype=dtype)
    return make(shape_q), make(shape_k), make(shape_k), make(shape_q)


def attend(q, k, v, mask, fn=flex_attention):
    return fn(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def step_fn(mode: str, tensors, mask, fn):
    """One forward (no autograd), or one forward + backward with the fixed cotangent."""
    q, k, v, do = tensors
    if mode == "fwd":
        def step():
            with torch.no_grad():
                attend(q, k, v, mask, fn)
        return step
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    return lambda: attend(qg, kg, vg, mask, fn).backward(do)


def time_cuda(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def run(args) -> list[dict]:
    spec = get_spec(args.spec)
    plan = spec_plan(spec)
    flops = useful_flops(plan, spec.q_heads, spec.head_dim)
    mask = block_mask(plan, spec.q_heads, "cuda")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec.dtype]
    q, k, v, do = inputs(spec, "cuda", dtype)
    compiled = torch.compile(flex_attention, dynamic=False)
    base = {"kind": "kernel", "impl": "flex_attention", "spec": args.spec, "shape": spec.__dict__,
            "flops_kind": "useful", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "python": sys.version.split()[0]}
    rows = []
    for mode in args.modes:
        step = step_fn(mode, (q, k, v, do), mask, compiled)
        torch.cuda.reset_peak_memory_stats()
        times = time_cuda(step, args.reps, args.warmup)
        ms = statistics.median(times)
        f = flops * (1 if mode == "fwd" else BWD_FACTOR)
        rows.append({**base, "mode": mode, "ms": round(ms, 4), "ms_min": round(min(times), 4),
                     "reps": args.reps, "tflops_useful": round(f / ms / 1e9, 1), "flops": f,
                     "process_peak_bytes": torch.cuda.max_memory_allocated()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    return ap


if __name__ == "__main__":
    run(parser().parse_args())
