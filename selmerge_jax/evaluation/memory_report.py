"""Memory/speed report of a model config across prompt lengths: prefill time, decode tokens/s, peak memory.

Per length (batch ``batch``, greedy, ``new_tokens`` generated), after a warm-up run that compiles:

* ``prefill_s``: chunked prefill of the prompt into the KV cache (``models.generate.prefill``), timed alone;
* ``decode_tokens_per_s``: ``new_tokens * batch`` over the time of a jitted scan of ``new_tokens`` greedy
  ``models.generate.decode_step`` calls on the prefilled cache (the decode loop alone, no prefill);
* ``prefill_plan_bytes``: XLA's compiled plan for the prefill (arguments + outputs + temp - aliased), the
  figure comparable across backends; ``peak_bytes``: the device allocator's peak where the backend reports
  it (GPU/TPU; null on CPU); ``forward_plan_bytes``: the plan of one full forward with the model's own
  attention (dense or select-and-merge), the training-time figure.

Timings are wall-clock medians of ``repeats`` runs; numbers from a shared CPU are indicative only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax.evaluation import plots
from selmerge_jax.evaluation.common import (
    ModelSource,
    check_positive_ints,
    load_model,
    progress,
    provenance,
    write_json,
)
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.generate import SamplingConfig, decode_step, init_caches, prefill, prefill_memory
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig

__all__ = ["MemoryReportConfig", "forward_plan_bytes", "measure_length", "run_memory_report"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryReportConfig:
    """``experiments/eval_memory.py``: model (``common.ModelSource``), lengths and generation shape."""

    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    model: ModelConfig | None = None
    rope: RopeConfig | None = None
    seed: int = 0
    lengths: tuple[int, ...] = (512, 1024, 2048)
    batch: int = 1
    new_tokens: int = 32
    chunk_size: int = 256
    repeats: int = 3
    forward_memory: bool = True
    output_dir: str = "runs/eval_memory"

    def __post_init__(self):
        check_positive_ints("MemoryReportConfig", "lengths", self.lengths)
        for name in ("batch", "chunk_size", "repeats"):
            check_positive_ints("MemoryReportConfig", name, [getattr(self, name)])
        check_positive_ints("MemoryReportConfig", "new_tokens", [self.new_tokens], minimum=2)
        ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)

    @property
    def source(self) -> ModelSource:
        return ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def forward_plan_bytes(model, batch: int, length: int) -> int:
    """Compiled plan of one full forward ``[batch, length]`` with the model's own attention (never run)."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    stats = fwd.lower(state, jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _decode_loop(graphdef, state, caches, first, start, *, steps: int):
    """``steps`` greedy decode steps from token ``first [B]`` at position ``start``; returns the last
    tokens."""
    model = nnx.merge(graphdef, state)
    layers = model.layer_states()  # sliced once, as generate's decode loop does

    def body(carry, i):
        caches, tok = carry
        pos = jnp.full(tok.shape, start, jnp.int32) + i
        nxt, _, caches = decode_step(model, caches, tok, pos, jax.random.key(0), SamplingConfig(),
                                     layers=layers)
        return (caches, nxt), None

    return jax.lax.scan(body, (caches, first), jnp.arange(steps))[0][1]


def measure_length(model, length: int, *, batch: int = 1, new_tokens: int = 32, chunk_size: int = 256,
                   repeats: int = 3, seed: int = 0) -> dict:
    """One row of the report for prompts of ``length`` random tokens (speed does not depend on their
    values)."""
    prompts = np.random.default_rng(seed).integers(0, model.config.vocab_size,
                                                   (batch, length)).astype(np.int32)
    capacity = -(-length // chunk_size) * chunk_size + new_tokens
    graphdef, state = nnx.split(model)

    def run_prefill():
        return prefill(model, prompts, init_caches(model, batch, capacity), chunk_size=chunk_size)

    logits, caches = run_prefill()  # compiles
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    run_decode = lambda: _decode_loop(graphdef, state, caches, first, length, steps=new_tokens)
    run_decode()  # compiles
    prefill_s = _median_seconds(lambda: run_prefill()[0], repeats)
    decode_s = _median_seconds(run_decode, repeats)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"length": int(length), "batch": batch, "new_tokens": new_tokens, "prefill_s": prefill_s,
            "prefill_tokens_per_s": batch * length / prefill_s,
            "decode_tokens_per_s": batch * new_tokens / decode_s,
            "prefill_plan_bytes": prefill_memory(model, batch=batch, prompt_len=length, chunk_size=chunk_size,
                                                 capacity=capacity)["peak"],
            "peak_bytes": stats.get("peak_bytes_in_use")}


def run_memory_report(cfg: MemoryReportConfig) -> dict:
    """Measures every length; writes ``memory.json`` and ``memory.png`` (time and memory vs length)."""
    model = load_model(cfg.source)
    rows = []
    for length in progress(cfg.lengths, "memory: lengths", unit="length"):
        row = measure_length(model, length, batch=cfg.batch, new_tokens=cfg.new_tokens,
                             chunk_size=cfg.chunk_size,
                             repeats=cfg.repeats, seed=cfg.seed)
        if cfg.forward_memory:
            row["forward_plan_bytes"] = forward_plan_bytes(model, cfg.batch, length)
        rows.append(row)
    m = model.config
    result = {"study": "memory", "attention": m.attention, "ms": dataclasses.asdict(m.ms)
              if m.attention == "ms"
              else None, "chunk_size": cfg.chunk_size, "rows": rows, **provenance()}
    json_path = write_json(os.path.join(cfg.output_dir, "memory.json"), result)
    x = [r["length"] for r in rows]
    series = {"prefill plan MiB": (x, [r["prefill_plan_bytes"] / 2**20 for r in rows]),
              "prefill s x 100": (x, [100 * r["prefill_s"] for r in rows]),
              "decode ms/token": (x, [1000 / r["decode_tokens_per_s"] for r in rows])}
    if cfg.forward_memory:
        series[f"{m.attention} forward plan MiB"] = (x, [r["forward_plan_bytes"] / 2**20 for r in rows])
    png_path = plots.lines(os.path.join(cfg.output_dir, "memory.png"), series, xlabel="prompt tokens",
                           ylabel="value (see legend)", logx=True, logy=True,
                           title=f"memory/speed vs length ({m.attention}, {jax.devices()[0].device_kind})")
    return {"json": json_path, "png": png_path,
            "rows": [{k: r[k] for k in ("length", "prefill_s", "decode_tokens_per_s", "prefill_plan_bytes")}
                     for r in rows]}
