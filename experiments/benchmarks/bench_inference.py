"""Long-prompt inference of an 8B model on one device: one-pass prefill (MS vs dense flash), then decode.

Random weights at real shapes (speed and memory). Cells: (prompt T, batch) from ``--grid issue23``
(Llama-3-8B shape, T in {8K, 32K, 128K, 512K, 1M} at batch 1 and {32K, 128K} at batch 4; 8K is the decode
reference) or ``--lengths``/``--batches``. Per cell and prefill variant, one JSON line:

* ``ms`` / ``dense``: the one-pass prefill writing every layer's K/V into a full cache (``generate.prefill``,
  ``prefill_attention="model"``; MS = the model's select-and-merge attention, dense = the same forward with
  cuDNN flash attention), compiled ahead of time (``prefill_compile_s``) and timed alone (time to first
  token, TTFT); then ``--new`` greedy decode steps over the full cache, for ``ms`` first selective
  (``select_decode_ms_per_token``: top blocks + centroids, ``kvcache.DecodeSelection``), then dense
  (``decode_ms_per_token``) continuing from where it stopped, each compiled ahead of time and timed alone
  (one prefill per cell: a dense 512K prefill takes minutes);
* ``ms+budget``: the MS prefill compressing into ``--budget`` slots as it goes (``--policy``), then decode
  over the budget cache (dense, and selective).

Every cell is planned first (``models.memory.inference_memory``); one the planner says cannot fit the device
is written as a ``refused`` row with its estimate and the largest prompt that fits, never run. ``--dry-run``
plans every cell and writes the rows without compiling anything. A ``inference_speedup`` line per cell gives
the MS/dense prefill ratio and the KL of MS from dense logits at the last prompt token.

  python experiments/benchmarks/bench_inference.py --grid issue23 --out experiments/results/<dir>/rows.jsonl
  python experiments/benchmarks/bench_inference.py --lengths 1048576 --prefill ms+budget --out r.jsonl
  JAX_PLATFORMS=cpu python experiments/benchmarks/bench_inference.py --preset tiny --lengths 256 --new 4
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # a 1M-token cache needs most of the GPU

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax import kvcache
from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.kernels.selective_decode import resolve
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.models import Llama, memory, preset
from selmerge_jax.models import generate_long as long
from selmerge_jax.models.generate import SamplingConfig, _decode, _prefill, init_caches, prefill_arguments

PRESETS = ("llama3-8b", "llama2-7b", "tiny")
VARIANTS = ("ms", "dense", "ms+budget")
GRIDS = {"issue23": [(8192, 1), (32768, 1), (131072, 1), (524288, 1), (1048576, 1), (32768, 4),
                     (131072, 4)]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (iteration only)")
    p.add_argument("--grid", choices=tuple(GRIDS), default=None, help="the cells of an issue (overrides "
                   "--lengths/--batches)")
    p.add_argument("--lengths", default="32768,131072", help="comma-separated prompt lengths")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes (every length at each)")
    p.add_argument("--prefill", default="ms,dense,ms+budget", help=f"comma-separated: {','.join(VARIANTS)}")
    p.add_argument("--new", type=int, default=32, help="decode steps timed after the prefill")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=17)
    p.add_argument("--ms-kernel", default="pallas", choices=("pallas", "reference"))
    p.add_argument("--dense-kernel", default="auto", choices=("auto", "cudnn", "xla"))
    p.add_argument("--policy", default="snapkv", help="compression policy of ms+budget")
    p.add_argument("--budget", type=int, default=4096, help="KV slots per layer of ms+budget")
    p.add_argument("--select-top-m", type=int, default=32, help="blocks a selective decode step attends")
    p.add_argument("--select-kernel", default="auto", choices=("auto", "xla", "pallas_triton"),
                   help="how a selective step attends its blocks (DecodeSelection.kernel)")
    p.add_argument("--dense-max-len", type=int, default=131072,
                   help="longest prompt of the dense baseline (longer: a lower bound from the longest run)")
    p.add_argument("--capacity-gb", type=float, default=None, help="default: the device's memory limit")
    p.add_argument("--dry-run", action="store_true", help="plan every cell, compile and run nothing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        args.lengths = tuple(int(x) for x in args.lengths.split(","))
        args.batches = tuple(int(x) for x in args.batches.split(","))
    except ValueError:
        p.error(f"--lengths={args.lengths!r} / --batches={args.batches!r}: expected comma-separated ints")
    args.prefill = tuple(args.prefill.split(","))
    args.cells = GRIDS[args.grid] if args.grid else [(t, b) for b in args.batches for t in args.lengths]
    for name, value, ok in (("--lengths", args.lengths, min(args.lengths) > 0),
                            ("--batches", args.batches, min(args.batches) > 0),
                            ("--prefill", args.prefill, set(args.prefill) <= set(VARIANTS)),
                            ("--new", args.new, args.new > 1),
                            ("--budget", args.budget, args.budget > 0),
                            ("--dense-max-len", args.dense_max_len, args.dense_max_len > 0),
                            ("--layers", args.layers, args.layers is None or args.layers > 0)):
        if not ok:
            p.error(f"{name}={value!r} is not allowed (lengths, batches, budget, dense-max-len and layers "
                    f"positive, new >= 2, prefill in {','.join(VARIANTS)})")
    try:
        compression(args)
    except ValueError as e:
        p.error(str(e))
    return args


def compression(args) -> KVCompressionConfig:
    """The ms+budget cells' policy: ``--budget`` slots, a prompt chunk (slack) of up to 256 tokens, SnapKV's
    window of up to 32 queries and a recent window of up to 64 (both at most a quarter of the budget)."""
    quarter = max(args.budget // 4, 1)
    return KVCompressionConfig(policy=args.policy, budget=args.budget, slack=min(256, args.budget), sink=4,
                               window=min(64, quarter), obs_window=min(32, quarter), pool_kernel=7)


def selection(args, capacity: int) -> kvcache.DecodeSelection | None:
    """The selective decode of a cache of ``capacity`` slots; None when it holds too few blocks to select."""
    blocks = capacity // args.block_size
    if blocks < 3:  # a sink block and a local block leave nothing to choose
        return None
    return kvcache.DecodeSelection(block=args.block_size, top_m=min(args.select_top_m, blocks),
                                   sink_blocks=1, local_blocks=1, kernel=args.select_kernel)


def model_config(args, attention: str, seq_len: int):
    ms = MSAttentionConfig(block_size=args.block_size, top_k=args.top_k, selection_source="previous",
                           selection_heads="kv")
    kw = dict(attention=attention, ms=ms, ms_kernel=args.ms_kernel, dense_kernel=args.dense_kernel,
              dtype="bfloat16", param_dtype="bfloat16", max_seq_len=max(seq_len, 8192))
    if args.layers is not None:
        kw["num_layers"] = args.layers
    return preset(args.preset, **kw)


def _capacity(args) -> int:
    if args.capacity_gb is not None:
        return int(args.capacity_gb * 2**30)
    return long.device_memory_limit() or 80 * 2**30


def _peak_gb():
    stats = jax.devices()[0].memory_stats() or {}
    return None if "peak_bytes_in_use" not in stats else round(stats["peak_bytes_in_use"] / 2**30, 2)


def _slots(seq_len: int, new: int, block: int) -> int:
    """Full-cache slots: the prompt and the new tokens, rounded up to whole blocks (selective decode)."""
    return -(-(seq_len + new) // block) * block


def plan(args, variant: str, seq_len: int, batch: int) -> dict:
    """The cell's row before anything runs: the planner's estimate, and ``refused`` when it does not fit."""
    cfg = model_config(args, "dense" if variant == "dense" else "ms", seq_len)
    comp = compression(args) if variant == "ms+budget" else None
    slots = _slots(seq_len, 4 * args.new, args.block_size)  # room for both decodes and their warm-ups
    row = {"bench": "inference", "preset": args.preset, "layers": cfg.num_layers, "batch": batch,
           "seq_len": seq_len, "prefill": variant, "new_tokens": args.new,
           "budget": None if comp is None else comp.budget, "policy": None if comp is None else comp.policy}
    if comp is not None and comp.budget >= seq_len:
        return {**row, "status": "refused", "reason": f"budget={comp.budget} is not smaller than the prompt"}
    kw = dict(new_tokens=slots - seq_len, compression=comp, prefill="model")
    est = memory.inference_memory(cfg, batch=batch, prompt_len=seq_len, **kw)
    row.update(estimate_gb=round(est.total / 2**30, 2), estimate=est.describe(),
               device_gb=round(_capacity(args) / 2**30, 1))
    if est.total > _capacity(args):
        fits = memory.largest_fitting_prompt(cfg, _capacity(args), batch=batch, **kw)
        return {**row, "status": "refused", "largest_prompt_that_fits": fits,
                "reason": f"estimated {est.total / 2**30:.1f} GiB > the device's "
                          f"{_capacity(args) / 2**30:.1f}"}
    return {**row, "status": "planned"}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out)[0])
    return out, time.perf_counter() - t0


def _decode_timed(model, caches, logits, start, new: int, comp, sel):
    """(compile s, ms per token, caches, whether each step ran the policy's scoring step) of ``new`` greedy
    decode steps: compiled ahead of time, run once
    (warm-up: the first run of an executable pays its allocations), then timed alone (the caches are donated
    and come back holding ``2 * (new - 1)`` more tokens). The step is ``generate.decode``'s own loop
    (``generate._decode``)."""
    if sel is not None and isinstance(caches[0], kvcache.KVCache):
        caches = long.with_selection(caches, sel)
    graphdef, state = nnx.split(model)
    comp = long.decode_compression(comp, caches, 2 * (new - 1))  # as generate.decode decides
    static = dict(sampling=SamplingConfig(), max_new=new, keep_logits=False,
                  cache_fn=long.decode_cache_fn(comp, sel))
    rest = (jax.random.key(0), jnp.int32(0), jnp.asarray((-1,), jnp.int32))
    t0 = time.perf_counter()
    compiled = _decode.lower(graphdef, state, caches, logits, start, *rest, **static).compile()
    compile_s = time.perf_counter() - t0
    *_, caches = compiled(state, caches, logits, start, *rest)
    jax.block_until_ready(caches)  # the timed call must not overlap the warm-up
    start = start + new - 1
    (*_, caches), dt = _timed(lambda: compiled(state, caches, logits, start, *rest))
    plain = tuple(c.cache if isinstance(c, kvcache.SelectiveCache) else c for c in caches)
    return compile_s, 1e3 * dt / (new - 1), plain, comp is not None


def run_cell(args, weights: dict, row: dict) -> tuple[dict, np.ndarray]:
    """One prefill, compiled ahead of time and then timed alone (the time to first token); over its cache
    the selective decode (MS variants), then the dense decode, continuing from where the first one stopped
    (each compiled ahead of time and timed alone). One prefill per cell: a dense 512K prefill is minutes."""
    variant, seq_len, batch = row["prefill"], row["seq_len"], row["batch"]
    cfg = model_config(args, "dense" if variant == "dense" else "ms", seq_len)
    comp = compression(args) if variant == "ms+budget" else None
    if "state" not in weights:  # one set of random weights for every cell
        weights["state"] = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))[1])()
    model = nnx.merge(nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0], weights["state"])
    prompts = np.random.default_rng(seq_len).integers(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
    caches = (long.compressed_caches(cfg, batch, comp, seq_len) if comp is not None
              else init_caches(model, batch, _slots(seq_len, 4 * args.new, args.block_size)))
    pargs, static = prefill_arguments(model, prompts, caches, prefill_attention="model", compression=comp,
                                      memory_limit=_capacity(args))
    del caches
    t0 = time.perf_counter()
    compiled = _prefill.lower(*pargs, **static).compile()
    row = {**row, "prefill_compile_s": round(time.perf_counter() - t0, 2)}
    (logits, caches), ttft = _timed(lambda: compiled(*pargs[1:]))

    row.update(prefill_s=round(ttft, 3), ttft_s=round(ttft, 3),
               prefill_tokens_per_s=round(batch * seq_len / ttft, 1),
               cache_gb=round(sum(kvcache.nbytes(c) for c in caches) / 2**30, 3),
               peak_gb_after_prefill=_peak_gb())  # the process's peak so far: the prefill's in a 1-cell run
    kept = np.asarray(logits, np.float32)
    start = jnp.full((batch,), seq_len, jnp.int32)
    sel = None if variant == "dense" else selection(args, caches[0].capacity)
    if sel is not None:
        compile_s, ms, caches, scoring = _decode_timed(model, caches, logits, start, args.new, comp, sel)
        row.update(select_decode_compile_s=round(compile_s, 2), select_decode_ms_per_token=round(ms, 3),
                   select_decode_scoring=scoring)
        start = start + 2 * (args.new - 1)
    compile_s, ms, caches, scoring = _decode_timed(model, caches, logits, start, args.new, comp, None)
    kv = cfg.num_kv_heads
    row.update(decode_compile_s=round(compile_s, 2), decode_ms_per_token=round(ms, 3), decode_scoring=scoring,
               status="ok",
               select_top_m=sel and sel.top_m, select_block=sel and sel.block,
               select_kernel=sel and resolve(sel.kernel, (batch, kv, cfg.num_heads // kv, cfg.head_size),
                                             sel.block),
               peak_gb_process=_peak_gb())
    return row, kept


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(p || q) of the softmaxes of two ``[B, V]`` logit arrays."""
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    env = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "python": platform.python_version()}
    rows, weights, dense_at = [], {}, {}
    for t, b in args.cells:
        logits, done = {}, {}
        for variant in args.prefill:
            row = plan(args, variant, t, b)
            if variant == "dense" and t > args.dense_max_len and row["status"] == "planned":
                row = {**row, "status": "not run",
                       "reason": f"dense above --dense-max-len={args.dense_max_len}"}
            if row["status"] == "planned" and not args.dry_run:
                try:
                    row, logits[variant] = run_cell(args, weights, row)
                except Exception as e:  # noqa: BLE001 -- an OOM in one cell must not lose the others
                    row = {**row, "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:1500]}"}
                    weights.clear()
            rows.append({**row, **env})
            done[variant] = rows[-1]
            emit(rows[-1], args.out)
        if done.get("dense", {}).get("status") == "ok":
            dense_at[b] = (t, done["dense"]["prefill_s"])
        elif done.get("ms", {}).get("status") == "ok" and b in dense_at:
            # Every part of a prefill grows at least linearly with the prompt, so the dense prefill at T takes
            # at least T/T0 times its time at the longest T0 it ran at: a lower bound on the speed-up.
            t0, dense_s = dense_at[b]
            emit({"bench": "inference_speedup", "preset": args.preset, "seq_len": t, "batch": b,
                  "prefill_speedup_lower_bound": round(dense_s * t / t0 / done["ms"]["prefill_s"], 3),
                  "dense_prefill_s_lower_bound": round(dense_s * t / t0, 3), "bound_from_seq_len": t0,
                  **env}, args.out)
        if "ms" in logits and "dense" in logits:
            ms_row, dense_row = done["ms"], done["dense"]
            emit({"bench": "inference_speedup", "preset": args.preset, "seq_len": t, "batch": b,
                  "prefill_speedup": round(dense_row["prefill_s"] / ms_row["prefill_s"], 3),
                  "kl_ms_vs_dense_last_token": kl(logits["dense"], logits["ms"]),
                  "median_decode_ms": statistics.median([ms_row["decode_ms_per_token"],
                                                         dense_row["decode_ms_per_token"]]), **env}, args.out)
    return rows


if __name__ == "__main__":
    main()
