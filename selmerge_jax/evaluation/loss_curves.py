"""Controllable loss curves: one command trains a family of attention configurations on the same token budget
and overlays their curves, with a table of final validation loss against attended fraction, FLOPs and memory.

Every variant is the same pretraining experiment (a YAML of ``experiments/configs``, through the training
runner) plus a few ``--set``-style overrides, e.g. ``model.ms.top_k=2`` or ``model.attention=dense``; steps,
batch and sequence length come from the base config, so every run sees the same tokens in the same order
(same seed). Runs write into ``<output_dir>/<variant>/`` and resume from their checkpoints when re-run.

Two options make the family a sharper instrument:

* ``warm_start``: one pretraining run ``<output_dir>/warm`` (usually dense) that every variant then fine-tunes
  from, the paper's setting (a dense-pretrained model adapted to select-and-merge attention). The family then
  measures how much of a trained model's fit each attention budget keeps, free of the early-training speed
  differences between attention kinds that dominate short from-scratch runs.
* ``seeds``: every variant once per training seed (init, data order) in ``<variant>/seed<k>/``; the table and
  the order check use the mean over seeds and report the spread, so an order is not read off one draw.
  Validation windows do not depend on the training seed (``data.validation_seed``), so every run of a
  variant scores the same text.

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
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax.evaluation import plots
from selmerge_jax.evaluation.common import provenance, write_json
from selmerge_jax.layers.attention import attended_fraction as layer_attended_fraction
from selmerge_jax.layers.attention import attended_keys
from selmerge_jax.models import Llama, count_params
from selmerge_jax.models.config import ModelConfig, parameter_shape_changes
from selmerge_jax.training.experiment import FinetuneConfig, PretrainConfig, load_experiment

__all__ = [
    "LossCurveSweepConfig",
    "attended_fraction",
    "figure",
    "ordered",
    "run_loss_curves",
    "train_flops_per_token",
    "train_step_bytes",
    "variant_config",
    "warm_config",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossCurveSweepConfig:
    """``experiments/eval_loss_curves.py``.

    Attributes:
      base_config: a pretraining YAML (``experiments/configs/*.yaml``) every variant starts from.
      base_overrides: ``key.path=value`` applied to the base first (e.g. a short CPU budget).
      variants: name -> list of overrides for that run (an empty list is the base itself).
      warm_start: overrides (on top of base_config + base_overrides) of a pretraining run ``warm`` that every
        variant fine-tunes from (its weights; a fresh optimizer and schedule); empty: variants start from scratch.
      seeds: training seeds to repeat every variant with (``train.seed``); empty: one run at the base's seed.
      output_dir: runs go to ``<output_dir>/<name>`` (``<name>/seed<k>`` with seeds); ``loss_curves.json``/
        ``.png``/``.md`` here.
    """

    base_config: str = "experiments/configs/demo.yaml"
    base_overrides: tuple[str, ...] = ()
    variants: dict = dataclasses.field(default_factory=dict)
    warm_start: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    output_dir: str = "runs/eval_loss_curves"

    def __post_init__(self):
        own = "LossCurveSweepConfig"
        if not self.variants:
            raise ValueError(f"{own}.variants must name at least one run, got none")
        for name, overrides in self.variants.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"{own}.variants: name {name!r} must be a non-empty string "
                                 "without '/' (it becomes a directory)")
            if not _override_list(overrides):
                raise ValueError(f"{own}.variants.{name} must be a list of 'key.path=value' "
                                 f"strings, got {overrides!r}")
        if not _override_list(self.warm_start):
            raise ValueError(f"{own}.warm_start must be a list of 'key.path=value' strings, got {self.warm_start!r}")
        if self.warm_start and "warm" in self.variants:
            raise ValueError(f"{own}.variants may not be named 'warm' with warm_start: the warm run trains into "
                             f"{os.path.join(self.output_dir, 'warm')}")
        if not isinstance(self.seeds, (list, tuple)) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.seeds):
            raise ValueError(f"{own}.seeds must be a list of ints >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{own}.seeds={list(self.seeds)} repeats a seed: each seed is one run")


def _override_list(overrides) -> bool:
    return isinstance(overrides, (list, tuple)) and all(isinstance(o, str) and "=" in o for o in overrides)


def _run_dir(sweep: LossCurveSweepConfig, name: str, seed: int | None) -> str:
    return os.path.join(sweep.output_dir, name, *([] if seed is None else [f"seed{seed}"]))


def variant_config(sweep: LossCurveSweepConfig, name: str, seed: int | None = None) -> PretrainConfig:
    """The validated config of one variant at ``seed`` (None: the base's seed), its output directory under the
    sweep's: a ``PretrainConfig``, or with ``warm_start`` a ``FinetuneConfig`` starting from the warm run."""
    overrides = [*sweep.base_overrides, *sweep.variants[name], *([] if seed is None else [f"train.seed={seed}"])]
    out = f"train.output_dir={_run_dir(sweep, name, seed)}"
    if not sweep.warm_start:
        return load_experiment(PretrainConfig, sweep.base_config, [*overrides, out])
    init = ["init.kind=checkpoint", f"init.path={os.path.join(sweep.output_dir, 'warm', 'checkpoints')}"]
    return load_experiment(FinetuneConfig, sweep.base_config, [*overrides, *init, out])


def warm_config(sweep: LossCurveSweepConfig) -> PretrainConfig | None:
    """The shared starting point of every variant (None without ``warm_start``)."""
    if not sweep.warm_start:
        return None
    overrides = [*sweep.base_overrides, *sweep.warm_start,
                 f"train.output_dir={os.path.join(sweep.output_dir, 'warm')}"]
    return load_experiment(PretrainConfig, sweep.base_config, overrides)


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
    # Final losses from the run's whole metrics file: a run found finished (re-running the sweep resumes it at
    # its last step) trains no steps, and its summary then has no history to read them from.
    return {
        "attention": m.attention, "ms": dataclasses.asdict(m.ms) if m.attention == "ms" else None,
        "seq_len": t, "tokens": summary["tokens"], "final_train_loss": losses[-1] if losses else None,
        "final_val_loss": vlosses[-1] if vlosses else None, "attended_fraction": attended_fraction(m, t),
        "train_flops_per_token": flops, "train_flops_total": flops * summary["tokens"],
        "compiled_step_bytes": train_step_bytes(m, cfg.train.batch_size, t),
        "measured_peak_bytes": summary["peak_bytes"], "tokens_per_s": summary["tokens_per_s"],
        "params": summary["params"], "curve": {"step": steps, "loss": losses, "val_step": vsteps, "val_loss": vlosses},
    }


def _configs(sweep: LossCurveSweepConfig) -> tuple[PretrainConfig | None, dict]:
    """The warm start's config (or None) and ``{(variant, seed): config}``, every one validated (a typo fails
    here, before anything trains)."""
    configs = {(name, seed): variant_config(sweep, name, seed)
               for name in sweep.variants for seed in (sweep.seeds or (None,))}
    tokens = {f"{n}" + ("" if k is None else f"/seed{k}"): c.train.steps * c.train.batch_size * c.train.seq_len
              for (n, k), c in configs.items()}
    if len(set(tokens.values())) > 1:
        raise ValueError(f"variants must train on the same token budget; got tokens per run {tokens}")
    warm = warm_config(sweep)
    for (name, seed), cfg in configs.items():
        changed = warm is not None and parameter_shape_changes(warm.model, cfg.model)
        if changed:  # a fine-tune restores warm's weights: fail now, not after warm has trained
            raise ValueError(f"LossCurveSweepConfig.warm_start: the warm model and variant {name!r} differ in "
                             f"parameter shapes (warm, {name}): {changed}")
    return warm, configs


def _mean_curve(rows: list[dict]) -> dict:
    """Point-wise mean of the seeds' curves, on the steps every seed logged."""
    out = {}
    for step_key, loss_key in (("step", "loss"), ("val_step", "val_loss")):
        curves = [dict(zip(r["curve"][step_key], r["curve"][loss_key], strict=True)) for r in rows]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        out[step_key], out[loss_key] = steps, [float(np.mean([c[s] for c in curves])) for s in steps]
    return out


def _over_seeds(rows: dict[int, dict]) -> dict:
    """One variant's row from its seeds' rows: losses and curves averaged, spread (sample std) and every seed's
    figures kept. Costs (fraction, FLOPs, bytes) do not depend on the seed."""
    first = next(iter(rows.values()))
    speeds = [r["tokens_per_s"] for r in rows.values() if r["tokens_per_s"] is not None]  # None: found finished
    out = {**first, "seeds": list(rows), "curve": _mean_curve(list(rows.values())),
           "tokens_per_s": float(np.median(speeds)) if speeds else None}
    for key in _LOSS_KEYS:
        values = [r[key] for r in rows.values()]
        if any(v is None for v in values):
            out[key], out[f"{key}_std"] = None, None
        else:
            out[key] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None  # one seed: no spread
    out["per_seed"] = {str(k): {"final_train_loss": r["final_train_loss"], "final_val_loss": r["final_val_loss"],
                                "curve": r["curve"]} for k, r in rows.items()}
    return out


_LOSS_KEYS = ("final_val_loss", "final_train_loss")


def ordered(runs: dict, key: str = "final_val_loss") -> dict | None:
    """Is ``key`` strictly lower the more a run attends? (the family's claim). None with fewer than two runs
    holding the figure."""
    if key not in _LOSS_KEYS:
        raise ValueError(f"ordered: key={key!r}; allowed: {_LOSS_KEYS}")
    have = {n: r[key] for n, r in runs.items() if r.get(key) is not None}
    if len(have) < 2:
        return None
    by_frac = sorted(have, key=lambda n: runs[n]["attended_fraction"])
    losses = [have[n] for n in by_frac]
    return {"pass": all(a > b for a, b in itertools.pairwise(losses)), "order": by_frac, key: losses}


def run_loss_curves(sweep: LossCurveSweepConfig) -> dict:
    """Trains the warm start (if any), then every variant (at every seed); writes ``loss_curves.json`` (rows,
    curves, the order checks), ``loss_curves.png`` and the summary table as ``loss_curves.md``."""
    warm, configs = _configs(sweep)
    warm_row = _run_variant(warm) if warm is not None else None
    rows = {key: _run_variant(c) for key, c in configs.items()}
    if sweep.seeds:
        runs = {n: _over_seeds({k: rows[(n, k)] for k in sweep.seeds}) for n in sweep.variants}
    else:
        runs = {n: rows[(n, None)] for n in sweep.variants}
    result = {"study": "loss_curves", "base_config": sweep.base_config, "base_overrides": list(sweep.base_overrides),
              "variants": {k: list(v) for k, v in sweep.variants.items()}, "warm_start": list(sweep.warm_start),
              "seeds": list(sweep.seeds), "warm": warm_row, "runs": runs,
              "order": {"val": ordered(runs, "final_val_loss"), "train": ordered(runs, "final_train_loss")},
              **provenance()}
    json_path = write_json(os.path.join(sweep.output_dir, "loss_curves.json"), result)
    png_path = figure(result, os.path.join(sweep.output_dir, "loss_curves.png"))
    table = summary_table(runs)
    with open(os.path.join(sweep.output_dir, "loss_curves.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return {"json": json_path, "png": png_path, "table": table}


def figure(result: dict, path: str) -> str:
    """The family's curves from ``loss_curves.json``'s content (so a figure can be redrawn from the file)."""
    runs = result["runs"]
    label = lambda n: f"{n} (attended {runs[n]['attended_fraction']:.2f})"
    train = {label(n): (r["curve"]["step"], r["curve"]["loss"]) for n, r in runs.items()}
    val = {label(n): (r["curve"]["val_step"], r["curve"]["val_loss"]) for n, r in runs.items() if r["curve"]["val_step"]}
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
        rows.append(f"| {name} | {r['attention']} | {r['attended_fraction']:.3f} | {_loss(r, 'final_val_loss')} | "
                    f"{_loss(r, 'final_train_loss')} | {r['train_flops_total'] / 1e12:.3f} | "
                    f"{r['compiled_step_bytes'] / 2**20:.1f} |")
    return "\n".join([head, *rows])


def _loss(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "n/a"
    std = row.get(f"{key}_std")
    return f"{row[key]:.4f}" + ("" if std is None else f" ± {std:.4f}")
