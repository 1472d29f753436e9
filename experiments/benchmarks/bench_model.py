"""One training step of a 7-8B model at 16K-256K tokens: MS attention vs dense flash attention (vs HF + PEFT).

Random weights at real shapes (speed and memory, not quality). Every cell is one (preset, T, attention) on one
device, batch 1, bf16 weights and activations, ``remat`` as given, chunked cross-entropy, AdamW; LoRA r16 on
q/k/v/o (``--mode lora``) or full training with float32 master weights (``--mode full``). Per cell, one JSON
line: compile seconds (ahead of time, no persistent cache), time to the first step done, the median step of
``--reps`` after one warm-up, tokens/s, model TFLOP/s and MFU, XLA's planned bytes and the device's peak.
After both attentions of a (preset, T) ran, a ``speedup`` row gives the MS/dense ratio. A cell the memory
planner (``selmerge_jax.models.memory``) refuses is written as ``status: refused`` with its estimate.

FLOPs (stated in every row as ``flop_formula``):
  LoRA:  4 * P * T   (forward 2PT + the backward's activation gradients 2PT; the frozen base gets no weight
         gradient; remat's recomputation is not useful work) + attention
  full:  6 * P * T + attention
  attention = 3.5 * 4 * L * N * H * sum_i keys_i  (QK^T and PV at 2 FLOPs per multiply-add; backward 2.5x the
         forward), keys_i = keys query i attends: i + 1 for dense causal, the selected and local tokens for MS
  P counts matmul parameters (embedding lookup excluded, the output head included). MFU is against
  --peak-tflops (989, the H100/H200 dense bf16 figure).

  python experiments/benchmarks/bench_model.py --presets llama2-7b --lengths 32768,131072 --out rows.jsonl
  python experiments/benchmarks/bench_model.py --presets llama2-7b --lengths 32768 --peer-hf  # + HF/PEFT
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import typing

_START = time.perf_counter()  # process start, for "time to first step"
# JAX reserves 75% of the GPU by default; a 256K step needs more of the H200 than that.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from selmerge_jax.attention import MSAttentionConfig  # noqa: E402
from selmerge_jax.layers.attention import attended_keys  # noqa: E402
from selmerge_jax.models import Llama, preset  # noqa: E402
from selmerge_jax.models.config import MLP_CHUNK_REMATS, RematPolicy  # noqa: E402
from selmerge_jax.models.lora import LoRAConfig, apply_lora  # noqa: E402
from selmerge_jax.models.memory import check_fits  # noqa: E402
from selmerge_jax.training.train_step import init_train_state, make_train_step, trainable_filter  # noqa: E402

PRESETS = ("llama2-7b", "llama3-8b", "llama3.2-1b")
ATTENTIONS = ("ms", "dense")
MODES = ("lora", "full")
LORA = LoRAConfig(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


@dataclasses.dataclass(frozen=True)
class Cell:
    preset: str
    seq_len: int
    attention: str
    mode: str


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive ints") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive ints")
    return values


def _choices(allowed):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(text.split(","))
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad}: allowed {allowed}")
        return values
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=_choices(PRESETS + ("tiny",)), default=("llama2-7b",))
    p.add_argument("--lengths", type=_positive_ints, default=(16384, 32768, 65536, 131072, 262144))
    p.add_argument("--attention", type=_choices(ATTENTIONS), default=ATTENTIONS)
    p.add_argument("--mode", choices=MODES, default="lora")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (iteration only)")
    p.add_argument("--remat", default="full", choices=typing.get_args(RematPolicy))
    p.add_argument("--mlp-chunk", type=int, default=None, metavar="TOKENS",
                   help="ModelConfig.mlp_chunk: the MLP block in slices of this many tokens (not with "
                        "--remat none): the backward holds one slice's [c, F] arrays")
    p.add_argument("--fuse-projections", action="store_true",
                   help="ModelConfig.fuse_projections: q/k/v as one matmul and gate/up as one")
    p.add_argument("--reps", type=int, default=5, help="timed steps after one warm-up (>= 1)")
    p.add_argument("--dense-reps-long", type=int, default=2, help="timed dense steps at T >= 65536")
    p.add_argument("--dense-max-len", type=int, default=131072,
                   help="dense cells above this length are skipped (reported as not run)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=17)
    p.add_argument("--ms-kernel", default="pallas", choices=("pallas", "reference"))
    p.add_argument("--dense-kernel", default="auto", choices=("auto", "cudnn", "xla"))
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--capacity-gb", type=float, default=None, help="default: the device's memory")
    p.add_argument("--peer-hf", action="store_true", help="also time HF transformers + PEFT (PyTorch, CUDA)")
    p.add_argument("--out", default=None, help="JSON lines file (appended); stdout always")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace one more step of each cell into DIR and add its 'profile' to the row: "
                        "the device's kernel time by kind (matmul, attention, Pallas, elementwise) and the "
                        "top kernels (trace_summary.py)")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps={args.reps}: must be >= 1")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers={args.layers}: must be >= 1")
    if args.mlp_chunk is not None and (args.mlp_chunk < 1 or args.remat not in MLP_CHUNK_REMATS):
        p.error(f"--mlp-chunk={args.mlp_chunk} with --remat={args.remat}: needs a positive count and --remat "
                f"in {MLP_CHUNK_REMATS} (ModelConfig.mlp_chunk)")
    return args


def environment() -> dict:
    dev = jax.devices()[0]
    return {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
            "python": platform.python_version(),
            # flags change what XLA compiles (streams, command buffers): a row records the ones it ran under
            "xla_flags": os.environ.get("XLA_FLAGS") or None}


def model_config(args, cell: Cell):
    overrides = dict(attention=cell.attention, max_seq_len=max(cell.seq_len, 4096), remat=args.remat,
                     mlp_chunk=args.mlp_chunk, fuse_projections=args.fuse_projections,
                     ms=MSAttentionConfig(block_size=args.block_size, top_k=args.top_k,
                                          selection_source="previous",
                                          selection_heads="kv"),
                     ms_kernel=args.ms_kernel, dense_kernel=args.dense_kernel, dtype="bfloat16",
                     param_dtype="bfloat16" if cell.mode == "lora" else "float32")
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    return preset(cell.preset, **overrides)


def matmul_params(cfg) -> int:
    d, h, n, k, f = cfg.d_model, cfg.head_size, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim
    return cfg.num_layers * (d * h * (2 * n + 2 * k) + 3 * d * f) + cfg.vocab_size * d


def step_flops(cfg, seq_len: int, mode: str) -> tuple[float, float]:
    """(total useful FLOPs of one step, the attention part); see the module docstring."""
    keys = (seq_len * (seq_len + 1) / 2 if cfg.attention == "dense"
            else float(attended_keys(cfg.ms, seq_len).sum()))
    attention = 3.5 * 4 * cfg.num_layers * cfg.num_heads * cfg.head_size * keys
    dense = (4 if mode == "lora" else 6) * matmul_params(cfg) * seq_len
    return dense + attention, attention


def _make(cfg, mode: str) -> Llama:
    model = Llama(cfg, rngs=nnx.Rngs(0))
    if mode == "lora":
        apply_lora(model, LORA, rngs=nnx.Rngs(1))
    return model


def _trainable(mode: str) -> str:
    return "lora" if mode == "lora" else "all"


def graphdef_of(cfg, mode: str):
    """The step's graph for ``cfg`` (the config is static graph data; no weights are made)."""
    return nnx.split(nnx.eval_shape(lambda: _make(cfg, mode)), trainable_filter(_trainable(mode)), ...)[0]


def build_state(cfg, mode: str, tx):
    """Random weights made on the device (never on the host), LoRA applied: the ``TrainState``."""
    return jax.jit(lambda: init_train_state(_make(cfg, mode), tx, trainable=_trainable(mode))[1])()


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _capacity(args) -> int:
    if args.capacity_gb is not None:
        return int(args.capacity_gb * 2**30)
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 80 * 2**30))


def run_cell(args, cell: Cell, state_cache: dict, first: bool) -> dict:
    cfg = model_config(args, cell)
    row = {"bench": "model_step", **dataclasses.asdict(cell), "layers": cfg.num_layers, "batch": 1,
           "remat": cfg.remat, "mlp_chunk": cfg.mlp_chunk, "fuse_projections": cfg.fuse_projections,
           "lora_rank": LORA.rank if cell.mode == "lora" else None, "dtype": cfg.dtype,
           "param_dtype": cfg.param_dtype, "loss_chunk": args.loss_chunk}
    if cell.attention == "ms":
        row.update(ms_kernel=cfg.ms_kernel, block_size=cfg.ms.block_size, top_k=cfg.ms.top_k,
                   attended_fraction=float(attended_keys(cfg.ms, cell.seq_len).sum()
                                           / (cell.seq_len * (cell.seq_len + 1) / 2)))
    else:
        row.update(dense_kernel=cfg.dense_kernel, attended_fraction=1.0)
    try:
        estimate = check_fits(cfg, _capacity(args), batch=1, seq_len=cell.seq_len,
                              lora_rank=LORA.rank if cell.mode == "lora" else None,
                              loss_chunk=args.loss_chunk)
        row["estimate_gb"] = round(estimate.total / 2**30, 2)
    except ValueError as e:
        return {**row, "status": "refused", "reason": str(e)}
    if cell.attention == "dense" and cell.seq_len > args.dense_max_len:
        return {**row, "status": "not run", "reason": f"dense above --dense-max-len={args.dense_max_len}"}
    tx = optax.adamw(1e-4)
    key = (cell.preset, cell.mode)
    if key not in state_cache:  # one set of weights per (preset, mode), reused by every T and attention
        state_cache.clear()
        t0 = time.perf_counter()
        state_cache[key] = build_state(cfg, cell.mode, tx)
        row["init_s"] = round(time.perf_counter() - t0, 2)
    state = state_cache.pop(key)  # the step donates it; put back only once the cell ran
    step = make_train_step(graphdef_of(cfg, cell.mode), tx, compute_dtype=jnp.bfloat16,
                           loss_chunk=args.loss_chunk)
    tokens = jax.random.randint(jax.random.key(cell.seq_len), (1, cell.seq_len + 1), 0, cfg.vocab_size,
                                jnp.int32)
    batch = {"tokens": tokens}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    row["first_step_s"] = round(time.perf_counter() - t1, 3)
    row["time_to_first_step_s"] = round(time.perf_counter() - (_START if first else t0), 2)
    row["time_to_first_step_from"] = "process start" if first else "cell start (compile + first step)"
    reps = args.reps if cell.attention == "ms" or cell.seq_len < 65536 else min(args.reps,
                                                                                args.dense_reps_long)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    if args.profile:
        state, row["profile"] = _profile(compiled, state, batch, os.path.join(
            args.profile, f"{cell.preset}_{cell.seq_len}_{cell.attention}_{cfg.remat}"))
    state_cache[key] = state
    step_s = statistics.median(times)
    flops, attn_flops = step_flops(cfg, cell.seq_len, cell.mode)
    mem = compiled.memory_analysis()
    plan = None
    if mem is not None:
        plan = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
    peak = _peak_bytes()
    row.update(status="ok", reps=reps, step_s=round(step_s, 4), step_times=[round(x, 4) for x in times],
               tokens_per_s=round(cell.seq_len / step_s, 1), model_tflops=round(flops / step_s / 1e12, 1),
               mfu=round(flops / step_s / (args.peak_tflops * 1e12), 4),
               attention_flop_share=round(attn_flops / flops, 4), loss=float(metrics["loss"]),
               plan_gb=None if plan is None else round(plan / 2**30, 2),
               peak_gb_process=None if peak is None else round(peak / 2**30, 2),
               flop_formula=("4*P*T + attention" if cell.mode == "lora" else "6*P*T + attention")
               + "; attention = 3.5*4*L*N*H*sum(keys)")
    return row


def _profile(compiled, state, batch, trace_dir: str):
    """One more step under the profiler; (state, where its device time went)."""
    from trace_summary import summarize  # beside this script

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
    return state, summarize(trace_dir)


def speedup_rows(rows: list[dict]) -> list[dict]:
    out = []
    ok = {(r["preset"], r["seq_len"], r["mode"], r["attention"]): r for r in rows
          if r.get("bench") == "model_step" and r.get("status") == "ok"}
    for (p, t, m, a), ms in ok.items():
        dense = ok.get((p, t, m, "dense"))
        if a == "ms" and dense is not None:
            out.append({"bench": "model_speedup", "preset": p, "seq_len": t, "mode": m,
                        "ms_step_s": ms["step_s"], "dense_step_s": dense["step_s"],
                        "speedup": round(dense["step_s"] / ms["step_s"], 3),
                        "ms_peak_gb": ms.get("peak_gb_process"),
                        "dense_peak_gb": dense.get("peak_gb_process")})
    return out


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def run_peer(args, env: dict) -> None:
    """HF transformers + PEFT rows, in a child process so PyTorch and JAX never share the GPU."""
    for p in args.presets:
        for t in args.lengths:
            if t > args.dense_max_len:
                continue
            cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "peer_hf_step.py"), "--preset", p,
                   "--seq-len", str(t), "--reps", str(args.reps if t < 65536 else args.dense_reps_long)]
            if args.layers is not None:
                cmd += ["--layers", str(args.layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"bench": "peer_hf_step", "preset": p, "seq_len": t,
                                                        "status": "failed", "reason": proc.stderr[-2000:]}
            emit({**row, **{k: v for k, v in env.items() if k not in row}}, args.out)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    env = environment()
    if args.peer_hf:
        run_peer(args, env)
    cells = [Cell(p, t, a,
                  args.mode) for p in args.presets for t in sorted(args.lengths) for a in args.attention]
    rows, cache = [], {}
    for i, cell in enumerate(cells):
        try:
            row = run_cell(args, cell, cache, first=i == 0)
        except Exception as e:  # noqa: BLE001 -- one failed cell (e.g. an OOM) must not lose the others
            row = {"bench": "model_step", **dataclasses.asdict(cell), "status": "failed",
                   "reason": f"{type(e).__name__}: {str(e)[:1500]}"}
        row.update(env)
        rows.append(row)
        emit(row, args.out)
    for row in speedup_rows(rows):
        emit({**row, **env}, args.out)
    return rows


if __name__ == "__main__":
    main()
