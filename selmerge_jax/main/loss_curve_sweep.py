"""Controllable loss curves: one command trains a family of attention configurations on the same token budget
and overlays their curves (``experiments/eval_loss_curves.py``), with a table of final validation loss against
attended fraction, FLOPs and memory.

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

Each run's row (losses, curves, attended fraction, FLOPs, memory) is measured by ``evaluation.loss_curves``.
"""

from __future__ import annotations

import dataclasses
import os

from selmerge_jax.evaluation import loss_curves
from selmerge_jax.evaluation.common import provenance, write_json
from selmerge_jax.main.config import FinetuneConfig, PretrainConfig, load_experiment
from selmerge_jax.main.finetune import run_finetune
from selmerge_jax.main.pretrain import run_pretrain, train_summary
from selmerge_jax.models.config import parameter_shape_changes

__all__ = ["LossCurveSweepConfig", "main", "run_loss_curves", "run_variant", "variant_config", "warm_config"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossCurveSweepConfig:
    """``experiments/eval_loss_curves.py``.

    Attributes:
      base_config: a pretraining YAML file or packaged config name (``demo``) every variant starts from.
      base_overrides: ``key.path=value`` applied to the base first (e.g. a short CPU budget).
      variants: name -> list of overrides for that run (an empty list is the base itself).
      warm_start: overrides (on top of base_config + base_overrides) of a pretraining run ``warm`` that every
        variant fine-tunes from (its weights; a fresh optimizer and schedule); empty: variants start from
        scratch.
      seeds: training seeds to repeat every variant with (``train.seed``); empty: one run at the base's seed.
      output_dir: runs go to ``<output_dir>/<name>`` (``<name>/seed<k>`` with seeds); ``loss_curves.json``/
        ``.png``/``.md`` here.
    """

    base_config: str = "demo"
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
            raise ValueError(f"{own}.warm_start must be a list of 'key.path=value' strings, "
                             f"got {self.warm_start!r}")
        if self.warm_start and "warm" in self.variants:
            raise ValueError(f"{own}.variants may not be named 'warm' with warm_start: "
                             "the warm run trains into "
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
    overrides = [*sweep.base_overrides, *sweep.variants[name],
                 *([] if seed is None else [f"train.seed={seed}"])]
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


def run_variant(cfg: PretrainConfig) -> dict:
    """Trains one run and returns its row; a ``FinetuneConfig`` (e.g. CRD NTK from scratch) goes through the
    fine-tuning runner, which owns the CRD forward."""
    runner = run_finetune if isinstance(cfg, FinetuneConfig) else run_pretrain
    summary = train_summary(cfg, runner(cfg))
    return loss_curves.variant_row(cfg.model, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                   output_dir=cfg.train.output_dir, summary=summary)


def _configs(sweep: LossCurveSweepConfig) -> tuple[PretrainConfig | None, dict]:
    """The warm start's config (or None) and ``{(variant, seed): config}``, every one validated (a typo fails
    here, before anything trains)."""
    configs = {(name, seed): variant_config(sweep, name, seed)
               for name in sweep.variants for seed in (sweep.seeds or (None,))}
    tokens = {f"{n}" + ("" if k is None
                        else f"/seed{k}"): c.train.steps * c.train.batch_size * c.train.seq_len
              for (n, k), c in configs.items()}
    if len(set(tokens.values())) > 1:
        raise ValueError(f"variants must train on the same token budget; got tokens per run {tokens}")
    warm = warm_config(sweep)
    for (name, _seed), cfg in configs.items():
        changed = warm is not None and parameter_shape_changes(warm.model, cfg.model)
        if changed:  # a fine-tune restores warm's weights: fail now, not after warm has trained
            raise ValueError("LossCurveSweepConfig.warm_start: the warm model and "
                             f"variant {name!r} differ in "
                             f"parameter shapes (warm, {name}): {changed}")
    return warm, configs


def run_loss_curves(sweep: LossCurveSweepConfig) -> dict:
    """Trains the warm start (if any), then every variant (at every seed); writes ``loss_curves.json`` (rows,
    curves, the order checks), ``loss_curves.png`` and the summary table as ``loss_curves.md``."""
    warm, configs = _configs(sweep)
    warm_row = run_variant(warm) if warm is not None else None
    rows = {key: run_variant(c) for key, c in configs.items()}
    if sweep.seeds:
        runs = {n: loss_curves.over_seeds({k: rows[(n, k)] for k in sweep.seeds}) for n in sweep.variants}
    else:
        runs = {n: rows[(n, None)] for n in sweep.variants}
    result = {"study": "loss_curves", "base_config": sweep.base_config,
              "base_overrides": list(sweep.base_overrides),
              "variants": {k: list(v) for k, v in sweep.variants.items()},
              "warm_start": list(sweep.warm_start),
              "seeds": list(sweep.seeds), "warm": warm_row, "runs": runs,
              "order": {"val": loss_curves.ordered(runs, "final_val_loss"),
                        "train": loss_curves.ordered(runs, "final_train_loss")},
              **provenance()}
    json_path = write_json(os.path.join(sweep.output_dir, "loss_curves.json"), result)
    png_path = loss_curves.figure(result, os.path.join(sweep.output_dir, "loss_curves.png"))
    table = loss_curves.summary_table(runs)
    with open(os.path.join(sweep.output_dir, "loss_curves.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return {"json": json_path, "png": png_path, "table": table}


def main(config: LossCurveSweepConfig) -> dict:
    """:func:`run_loss_curves`: the JSON and PNG paths and the summary table."""
    return run_loss_curves(config)
