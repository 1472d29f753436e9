"""Long-prompt inference of an 8B model on one device: one-pass prefill (MS vs dense flash), then decode.

Random weights at real shapes (speed and memory). Per cell (preset, prompt T, batch, prefill attention), one
JSON line: the one-pass prefill that writes every layer's K/V into the cache (``generate.prefill`` with
``prefill_attention="model"``; MS = the model's select-and-merge attention, dense = the same forward with
cuDNN flash attention), timed alone after a compile (its seconds are time to first token, TTFT), then
``--new`` greedy decode steps over the full cache (ms/token), the device's peak and the logits' KL divergence
of MS prefill from dense prefill at the last prompt token. A prompt the planner says cannot fit is refused
with its estimate instead of run.

  python experiments/benchmarks/bench_inference.py --preset llama3-8b --lengths 32768,131072 --out rows.jsonl
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

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.models import Llama, preset
from selmerge_jax.models.generate import decode, init_caches, prefill

PRESETS = ("llama3-8b", "llama2-7b", "tiny")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (iteration only)")
    p.add_argument("--lengths", default="32768,131072", help="comma-separated prompt lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", default="ms,dense", help="comma-separated: ms, dense")
    p.add_argument("--new", type=int, default=32, help="decode steps timed after the prefill")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=17)
    p.add_argument("--ms-kernel", default="pallas", choices=("pallas", "reference"))
    p.add_argument("--dense-kernel", default="auto", choices=("auto", "cudnn", "xla"))
    p.add_argument("--capacity-gb", type=float, default=None, help="default: the device's memory limit")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        args.lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError:
        p.error(f"--lengths={args.lengths!r}: expected comma-separated positive ints")
    args.prefill = tuple(args.prefill.split(","))
    for name, value, ok in (("--lengths", args.lengths, min(args.lengths) > 0),
                            ("--prefill", args.prefill, set(args.prefill) <= {"ms", "dense"}),
                            ("--batch", args.batch, args.batch > 0), ("--new", args.new, args.new > 1),
                            ("--layers", args.layers, args.layers is None or args.layers > 0)):
        if not ok:
            p.error(f"{name}={value!r} is not allowed (lengths, batch and layers "
                    "positive, new >= 2, prefill in "
                    "ms,dense)")
    return args


def model_config(args, attention: str, seq_len: int):
    ms = MSAttentionConfig(block_size=args.block_size, top_k=args.top_k, selection_source="previous",
                           selection_heads="kv")
    kw = dict(attention=attention, ms=ms, ms_kernel=args.ms_kernel, dense_kernel=args.dense_kernel,
              dtype="bfloat16", param_dtype="bfloat16", max_seq_len=max(seq_len, 8192))
    if args.layers is not None:
        kw["num_layers"] = args.layers
    return preset(args.preset, **kw)


def estimate_bytes(cfg, batch: int, capacity: int) -> int:
    """Weights + a bf16 cache of ``capacity`` slots per layer + one layer's prefill working set (q/k/v/o, the
    SwiGLU's three [T, F] arrays, the residual) + the last token's logits; the same closed form as the
    training planner (``models.memory``), without the backward."""
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.head_size
    params = cfg.num_layers * (d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f)
    params += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    cache = (cfg.num_layers * 2 * batch * cfg.num_kv_heads * capacity * h * 2
             + cfg.num_layers * batch * capacity * 8)
    working = batch * capacity * (3 * f + 4 * d + h * (cfg.num_heads + 2 * cfg.num_kv_heads)) * 2
    return params * 2 + cache + working + batch * cfg.vocab_size * 4 + int(1.5 * 2**30)


def _capacity(args) -> int:
    if args.capacity_gb is not None:
        return int(args.capacity_gb * 2**30)
    return int((jax.devices()[0].memory_stats() or {}).get("bytes_limit", 80 * 2**30))


def _peak_gb():
    stats = jax.devices()[0].memory_stats() or {}
    return None if "peak_bytes_in_use" not in stats else round(stats["peak_bytes_in_use"] / 2**30, 2)


def run_cell(args, state_cache: dict, attention: str, seq_len: int) -> tuple[dict, np.ndarray | None]:
    cfg = model_config(args, attention, seq_len)
    capacity = seq_len + args.new
    row = {"bench": "inference", "preset": args.preset, "layers": cfg.num_layers, "batch": args.batch,
           "seq_len": seq_len, "prefill": attention, "new_tokens": args.new}
    need = estimate_bytes(cfg, args.batch, capacity)
    row["estimate_gb"] = round(need / 2**30, 2)
    if need > _capacity(args):
        return {**row, "status": "refused", "reason": f"estimated {need / 2**30:.1f} GiB > the device's "
                                                      f"{_capacity(args) / 2**30:.1f} GiB"}, None
    if "state" not in state_cache:  # one set of random weights for every cell
        state_cache["state"] = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))[1])()
    model = nnx.merge(nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0],
                      state_cache["state"])
    prompts = np.random.default_rng(seq_len).integers(0, cfg.vocab_size,
                                                      (args.batch, seq_len)).astype(np.int32)
    caches = init_caches(model, args.batch, capacity)
    t0 = time.perf_counter()
    logits, caches = prefill(model, prompts, caches, prefill_attention="model")
    jax.block_until_ready(logits)
    row["first_prefill_s"] = round(time.perf_counter() - t0, 3)  # compile included
    caches = init_caches(model, args.batch, capacity)
    t0 = time.perf_counter()
    logits, caches = prefill(model, prompts, caches, prefill_attention="model")
    jax.block_until_ready(logits)
    row["prefill_s"] = row["ttft_s"] = round(time.perf_counter() - t0, 3)
    start = jnp.full((args.batch,), seq_len, jnp.int32)
    times = []
    for _ in range(2):  # the first call compiles; both decode the same positions (the cache is overwritten)
        t0 = time.perf_counter()
        out, caches = decode(model, caches, logits, start, max_new_tokens=args.new)
        jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - t0)
    row.update(status="ok", decode_ms_per_token=round(1e3 * times[-1] / (args.new - 1), 3),
               prefill_tokens_per_s=round(args.batch * seq_len / row["prefill_s"], 1),
               peak_gb_process=_peak_gb())
    return row, np.asarray(logits, np.float32)


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(p || q) of the softmaxes of two ``[B, V]`` logit arrays."""
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    env = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "python": platform.python_version()}
    rows, cache = [], {}
    for t in sorted(args.lengths):
        logits = {}
        for attention in args.prefill:
            try:
                row, logits[attention] = run_cell(args, cache, attention if attention == "ms" else "dense", t)
            except Exception as e:  # noqa: BLE001 -- an OOM in one cell must not lose the others
                row = {"bench": "inference", "preset": args.preset, "seq_len": t, "prefill": attention,
                       "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:1500]}"}
                cache.clear()
            rows.append({**row, **env})
            emit(rows[-1], args.out)
        if logits.get("ms") is not None and logits.get("dense") is not None:
            ms_row, dense_row = (next(r for r in rows[::-1] if r.get("prefill") == a and r["seq_len"] == t)
                                 for a in ("ms", "dense"))
            emit({"bench": "inference_speedup", "preset": args.preset, "seq_len": t, "batch": args.batch,
                  "prefill_speedup": round(dense_row["prefill_s"] / ms_row["prefill_s"], 3),
                  "kl_ms_vs_dense_last_token": kl(logits["dense"], logits["ms"]),
                  "median_decode_ms": statistics.median([ms_row["decode_ms_per_token"],
                                                         dense_row["decode_ms_per_token"]]), **env}, args.out)
    return rows


if __name__ == "__main__":
    main()
