"""Loss-curve families, the measurement: what one trained run of a family reports (final losses, curves read
from its metrics file, attended fraction, FLOPs, compiled memory), the mean over seeds, the order check
(lower loss the more a run attends), the figure and the table. Training the family is the application's
(``selmerge_jax.main.loss_curve_sweep``, ``experiments/eval_loss_curves.py``).

Cost figures are computed, not timed, so they compare across machines:

* attended fraction: keys each query attends (selected regions, its causal local block, one centroid per
  unselected candidate region when ``centroids``) over the keys of causal dense attention, averaged over the
  sequence, from the selection rule of docs/ARCHITECTURE.md;
* training FLOPs per token: ``6 * matmul params + 12 * layers * heads * head_dim * mean attended keys``
  (forward QK^T and PV at 2 FLOPs per multiply-add, times 3 for forward + backward);
* peak memory: XLA's compiled plan (arguments + outputs + temp) for one forward+backward of a batch, or the
  device's measured peak during training where the backend reports it (GPU/TPU).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax.evaluation import plots
from selmerge_jax.layers.attention import attended_fraction as layer_attended_fraction
from selmerge_jax.layers.attention import attended_keys
from selmerge_jax.models import Llama, count_params
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.training.metrics import read_jsonl
from selmerge_jax.validation import check_choice

__all__ = [
    "attended_fraction",
    "figure",
    "over_seeds",
    "ordered",
    "read_curves",
    "summary_table",
    "train_flops_per_token",
    "train_step_bytes",
    "variant_row",
]


def attended_fraction(model: ModelConfig, seq_len: int) -> float:
    """Attended keys over causal dense keys, summed over the sequence (1.0 for dense attention)."""
    if model.attention == "dense":
        return 1.0
    return layer_attended_fraction(model.ms, seq_len)


def _mean_attended(model: ModelConfig, seq_len: int) -> float:
    if model.attention == "dense":
        return (seq_len + 1) / 2
    return float(attended_keys(model.ms, seq_len).mean())


def train_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (module docstring): dense matmuls plus the attention actually computed."""
    abstract = nnx.eval_shape(lambda: Llama(model, rngs=nnx.Rngs(0)))
    matmul_params = count_params(abstract) - model.vocab_size * model.d_model  # the lookup is not a matmul
    if model.tie_embeddings:
        matmul_params += model.vocab_size * model.d_model  # ...but the tied output projection is
    attn = 12 * model.num_layers * model.num_heads * model.head_size * _mean_attended(model, seq_len)
    return float(6 * matmul_params + attn)


@functools.lru_cache(maxsize=32)  # seeds repeat a variant's shapes: compile each plan once
def train_step_bytes(model: ModelConfig, batch: int, seq_len: int) -> int:
    """XLA's planned peak bytes of one forward+backward (loss gradient) on one device, compiled not run."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(model, rngs=nnx.Rngs(0))))

    def loss(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    stats = jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def read_curves(output_dir: str) -> tuple[list, list, list, list]:
    """``(steps, losses, val_steps, val_losses)`` of a run, from its ``metrics.jsonl``."""
    path = os.path.join(output_dir, "metrics.jsonl")
    train, val = read_jsonl(path, key="loss"), read_jsonl(path, key="val_loss")
    return list(train), [r["loss"] for r in train.values()], list(val), [r["val_loss"] for r in val.values()]


def variant_row(model: ModelConfig, *, seq_len: int, batch_size: int, output_dir: str, summary: dict) -> dict:
    """One trained run's row: ``summary`` (``main.pretrain.train_summary``) plus the curves in ``output_dir``
    and the computed costs of ``model`` at ``seq_len``."""
    steps, losses, vsteps, vlosses = read_curves(output_dir)
    t, m = seq_len, model
    flops = train_flops_per_token(m, t)
    # Final losses from the run's whole metrics file: a run found finished (re-running the sweep resumes it at
    # its last step) trains no steps, and its summary then has no history to read them from.
    return {
        "attention": m.attention, "ms": dataclasses.asdict(m.ms) if m.attention == "ms" else None,
        "seq_len": t, "tokens": summary["tokens"], "final_train_loss": losses[-1] if losses else None,
        "final_val_loss": vlosses[-1] if vlosses else None, "attended_fraction": attended_fraction(m, t),
        "train_flops_per_token": flops, "train_flops_total": flops * summary["tokens"],
        "compiled_step_bytes": train_step_bytes(m, batch_size, t),
        "measured_peak_bytes": summary["peak_bytes"], "tokens_per_s": summary["tokens_per_s"],
        "params": summary["params"],
        "curve": {"step": steps, "loss": losses, "val_step": vsteps, "val_loss": vlosses},
    }


def _mean_curve(rows: list[dict]) -> dict:
    """Point-wise mean of the seeds' curves, on the steps every seed logged."""
    out = {}
    for step_key, loss_key in (("step", "loss"), ("val_step", "val_loss")):
        curves = [dict(zip(r["curve"][step_key], r["curve"][loss_key], strict=True)) for r in rows]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        out[step_key], out[loss_key] = steps, [float(np.mean([c[s] for c in curves])) for s in steps]
    return out


def over_seeds(rows: dict[int, dict]) -> dict:
    """One variant's row from its seeds' rows: losses and curves averaged, spread (sample std) and every
    seed's figures kept. Costs (fraction, FLOPs, bytes) do not depend on the seed."""
    first = next(iter(rows.values()))
    # None: found finished
    speeds = [r["tokens_per_s"] for r in rows.values() if r["tokens_per_s"] is not None]
    out = {**first, "seeds": list(rows), "curve": _mean_curve(list(rows.values())),
           "tokens_per_s": float(np.median(speeds)) if speeds else None}
    for key in _LOSS_KEYS:
        values = [r[key] for r in rows.values()]
        if any(v is None for v in values):
            out[key], out[f"{key}_std"] = None, None
        else:
            out[key] = float(np.mean(values))
            # one seed: no spread
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    out["per_seed"] = {str(k): {"final_train_loss": r["final_train_loss"],
                                "final_val_loss": r["final_val_loss"],
                                "curve": r["curve"]} for k, r in rows.items()}
    return out


_LOSS_KEYS = ("final_val_loss", "final_train_loss")


def ordered(runs: dict, key: str = "final_val_loss") -> dict | None:
    """Is ``key`` strictly lower the more a run attends? (the family's claim). None with fewer than two runs
    holding the figure."""
    check_choice("key", key, _LOSS_KEYS)
    have = {n: r[key] for n, r in runs.items() if r.get(key) is not None}
    if len(have) < 2:
        return None
    by_frac = sorted(have, key=lambda n: runs[n]["attended_fraction"])
    losses = [have[n] for n in by_frac]
    return {"pass": all(a > b for a, b in itertools.pairwise(losses)), "order": by_frac, key: losses}


def figure(result: dict, path: str) -> str:
    """The family's curves from ``loss_curves.json``'s content (so a figure can be redrawn from the file)."""
    runs = result["runs"]
    label = lambda n: f"{n} (attended {runs[n]['attended_fraction']:.2f})"
    train = {label(n): (r["curve"]["step"], r["curve"]["loss"]) for n, r in runs.items()}
    val = {label(n): (r["curve"]["val_step"], r["curve"]["val_loss"]) for n, r in runs.items()
           if r["curve"]["val_step"]}
    title = f"loss curves, {runs[next(iter(runs))]['tokens']:,} tokens per run"
    if result.get("warm"):
        title += f" after a shared warm start of {result['warm']['tokens']:,}"
    if result.get("seeds"):
        title += f", mean of {len(result['seeds'])} seeds (validation: dashed)"
    return plots.curves(path, train, val, title=title)


def summary_table(runs: dict) -> str:
    """Markdown table: final validation (and training) loss against attended fraction, FLOPs and memory; with
    seeds, losses are means ± sample std over the seeds."""
    head = ("| run | attention | attended fraction | final val loss | final train loss | train TFLOPs | "
            "step MiB (compiled) |\n|---|---|---|---|---|---|---|")
    rows = []
    for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["attended_fraction"]):
        rows.append(f"| {name} | {r['attention']} | {r['attended_fraction']:.3f} | "
                    f"{_loss(r, 'final_val_loss')} | "
                    f"{_loss(r, 'final_train_loss')} | {r['train_flops_total'] / 1e12:.3f} | "
                    f"{r['compiled_step_bytes'] / 2**20:.1f} |")
    return "\n".join([head, *rows])


def _loss(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "n/a"
    std = row.get(f"{key}_std")
    return f"{row[key]:.4f}" + ("" if std is None else f" ± {std:.4f}")
