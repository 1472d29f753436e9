"""Controllable loss curves: one command trains a family of attention configurations on the same token budget
and overlays their curves, with a table of final validation loss against attended fraction, FLOPs and memory.

Every variant is the same pretraining experiment (a YAML of ``experiments/configs``, through the training
runner) plus a few ``--set``-style overrides, e.g. ``model.ms.top_k=2`` or ``model.attention=dense``; steps,
batch and sequence length come from the base config, so every run sees the same tokens in the same order
(same seed). Runs write into ``<output_dir>/<variant>/`` and resume from their checkpoints when re-run.

Cost figures are computed, not timed, so they compare across machines:

* attended fraction: keys each query attends (selected regions, its causal local block, one centroid per
  unselected candidate region when ``centroids``) over the keys of causal dense attention, averaged over the
  sequence, from the selection rule of ARCHITECTURE.md;
* training FLOPs per token: ``6 * matmul params + 12 * layers * heads * head_dim * mean attended keys``
  (forward QK^T and PV at 2 FLOPs per multiply-add, times 3 for forward + backward);
* peak memory: XLA's compiled plan (arguments + outputs + temp) for one forward+backward of a batch, or the
  device's measured peak during training where the backend reports it (GPU/TPU).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.evaluation import plots
from selmerge_jax.evaluation.common import provenance, write_json
from selmerge_jax.models import Llama, count_params
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.training.experiment import PretrainConfig, load_experiment

__all__ = [
    "LossCurveSweepConfig",
    "attended_fraction",
    "run_loss_curves",
    "train_flops_per_token",
    "train_step_bytes",
    "variant_config",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossCurveSweepConfig:
    """``experiments/eval_loss_curves.py``.

    Attributes:
      base_config: a pretraining YAML (``experiments/configs/*.yaml``) every variant starts from.
      base_overrides: ``key.path=value`` applied to the base first (e.g. a short CPU budget).
      variants: name -> list of overrides for that run (an empty list is the base itself).
      output_dir: runs go to ``<output_dir>/<name>``; ``loss_curves.json``/``.png`` here.
    """

    base_config: str = "experiments/configs/demo.yaml"
    base_overrides: tuple[str, ...] = ()
    variants: dict = dataclasses.field(default_factory=dict)
    output_dir: str = "runs/eval_loss_curves"

    def __post_init__(self):
        if not self.variants:
            raise ValueError("LossCurveSweepConfig.variants must name at least one run, got none")
        for name, overrides in self.variants.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"LossCurveSweepConfig.variants: name {name!r} must be a non-empty string "
                                 "without '/' (it becomes a directory)")
            if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) and "=" in o
                                                                    for o in overrides):
                raise ValueError(f"LossCurveSweepConfig.variants.{name} must be a list of 'key.path=value' "
                                 f"strings, got {overrides!r}")


def variant_config(sweep: LossCurveSweepConfig, name: str) -> PretrainConfig:
    """The validated pretraining config of one variant (its output directory set under the sweep's)."""
    overrides = [*sweep.base_overrides, *sweep.variants[name],
                 f"train.output_dir={os.path.join(sweep.output_dir, name)}"]
    return load_experiment(PretrainConfig, sweep.base_config, overrides)


def _attended_keys(ms: MSAttentionConfig, seq_len: int) -> np.ndarray:
    """Keys attended by each query position ``[seq_len]`` (tokens of selected + local regions, centroids)."""
    i = np.arange(seq_len)
    w = ms.block_size
    group_start = (i // w) // ms.merge * ms.merge  # gs, first region of the query's group
    candidates = group_start  # regions strictly before the group
    selected = np.minimum(candidates, ms.num_selected)
    keys = selected * w + (i - group_start * w + 1)
    if ms.centroids:
        keys = keys + (candidates - selected)
    return keys


def attended_fraction(model: ModelConfig, seq_len: int) -> float:
    """Attended keys over causal dense keys, summed over the sequence (1.0 for dense attention)."""
    if model.attention == "dense":
        return 1.0
    dense = np.arange(1, seq_len + 1)
    return float(_attended_keys(model.ms, seq_len).sum() / dense.sum())


def _mean_attended(model: ModelConfig, seq_len: int) -> float:
    if model.attention == "dense":
        return (seq_len + 1) / 2
    return float(_attended_keys(model.ms, seq_len).mean())


def train_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (module docstring): dense matmuls plus the attention actually computed."""
    abstract = nnx.eval_shape(lambda: Llama(model, rngs=nnx.Rngs(0)))
    matmul_params = count_params(abstract) - model.vocab_size * model.d_model  # the lookup is not a matmul
    if model.tie_embeddings:
        matmul_params += model.vocab_size * model.d_model  # ...but the tied output projection is
    attn = 12 * model.num_layers * model.num_heads * model.head_size * _mean_attended(model, seq_len)
    return float(6 * matmul_params + attn)


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


def _curves(output_dir: str) -> tuple[list, list, list, list]:
    from selmerge_jax.training.metrics import read_jsonl

    path = os.path.join(output_dir, "metrics.jsonl")
    train, val = read_jsonl(path, key="loss"), read_jsonl(path, key="val_loss")
    return list(train), [r["loss"] for r in train.values()], list(val), [r["val_loss"] for r in val.values()]


def _run_variant(cfg: PretrainConfig) -> dict:
    """Trains one run and returns its row; a ``FinetuneConfig`` (e.g. CRD NTK from scratch) goes through the
    fine-tuning runner, which owns the CRD forward."""
    from selmerge_jax.training.experiment import FinetuneConfig
    from selmerge_jax.training.runner import run_finetune, run_pretrain, train_summary

    runner = run_finetune if isinstance(cfg, FinetuneConfig) else run_pretrain
    summary = train_summary(cfg, runner(cfg))
    steps, losses, vsteps, vlosses = _curves(cfg.train.output_dir)
    t, m = cfg.train.seq_len, cfg.model
    flops = train_flops_per_token(m, t)
    return {
        "attention": m.attention, "ms": dataclasses.asdict(m.ms) if m.attention == "ms" else None,
        "seq_len": t, "tokens": summary["tokens"], "final_train_loss": summary["final_train_loss"],
        "final_val_loss": summary["final_val_loss"], "attended_fraction": attended_fraction(m, t),
        "train_flops_per_token": flops, "train_flops_total": flops * summary["tokens"],
        "compiled_step_bytes": train_step_bytes(m, cfg.train.batch_size, t),
        "measured_peak_bytes": summary["peak_bytes"], "tokens_per_s": summary["tokens_per_s"],
        "params": summary["params"], "curve": {"step": steps, "loss": losses, "val_step": vsteps, "val_loss": vlosses},
    }


def run_loss_curves(sweep: LossCurveSweepConfig) -> dict:
    """Trains every variant; writes ``loss_curves.json`` (rows + curves), ``loss_curves.png`` and the summary
    table as ``loss_curves.md``."""
    configs = {name: variant_config(sweep, name) for name in sweep.variants}  # fail on a typo before training
    tokens = {name: c.train.steps * c.train.batch_size * c.train.seq_len for name, c in configs.items()}
    if len(set(tokens.values())) > 1:
        raise ValueError(f"variants must train on the same token budget; got tokens per run {tokens}")
    runs = {name: _run_variant(c) for name, c in configs.items()}
    result = {"study": "loss_curves", "base_config": sweep.base_config, "base_overrides": list(sweep.base_overrides),
              "variants": {k: list(v) for k, v in sweep.variants.items()}, "runs": runs, **provenance()}
    json_path = write_json(os.path.join(sweep.output_dir, "loss_curves.json"), result)
    label = lambda n: f"{n} (attended {runs[n]['attended_fraction']:.2f})"
    train = {label(n): (r["curve"]["step"], r["curve"]["loss"]) for n, r in runs.items()}
    val = {label(n): (r["curve"]["val_step"], r["curve"]["val_loss"]) for n, r in runs.items() if r["curve"]["val_step"]}
    png_path = plots.curves(os.path.join(sweep.output_dir, "loss_curves.png"), train, val,
                            title=f"loss curves, {next(iter(tokens.values())):,} tokens per run")
    table = summary_table(runs)
    with open(os.path.join(sweep.output_dir, "loss_curves.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return {"json": json_path, "png": png_path, "table": table}


def summary_table(runs: dict) -> str:
    """Markdown table: final validation loss against attended fraction, FLOPs and memory."""
    head = ("| run | attention | attended fraction | final val loss | train TFLOPs | step MiB (compiled) |\n"
            "|---|---|---|---|---|---|")
    rows = []
    for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["attended_fraction"]):
        val = "n/a" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        rows.append(f"| {name} | {r['attention']} | {r['attended_fraction']:.3f} | {val} | "
                    f"{r['train_flops_total'] / 1e12:.3f} | {r['compiled_step_bytes'] / 2**20:.1f} |")
    return "\n".join([head, *rows])
