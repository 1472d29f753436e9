"""``experiments/eval_reproduction.py``: the paper-claims reproduction in one time-bounded command: a
loss-curve family, a CRD NTK run beside its plain twin, the passkey grid on both, and KV-compression fidelity
on one trained model.

Stages run in this order, each only if the wall-clock budget still has room for it, and every stage rewrites
its JSON as soon as it has something, so a run cut off by its time limit still leaves what it finished:

1. the family (``variants``, all pretraining on the same tokens) with the CRD run right after ``crd_pair``,
   whose overrides it copies plus ``crd_overrides`` (a ``FinetuneConfig`` from scratch: the fine-tuning runner
   owns the CRD NTK forward);
2. the passkey grid, one length at a time, on the CRD run (its own fixed-base inference rule) and on its
   twin (``passkey_rope``, default the same rule), so the two heat maps share prompts and compiled shapes;
3. fidelity (``evaluation.fidelity``) on ``fidelity_variant``, one compression setting at a time.

``study.json`` gathers the stage log (seconds, skipped stages) and the acceptance checks of issue #7:
(a) an ms run at attended fraction <= 1/8 within 3% of dense validation loss, (b) validation loss ordered by
attended fraction, (c) CRD passkey accuracy at 16x the training length >= 95%.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import numpy as np

from selmerge_jax.data.config import DataConfig
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.evaluation import fidelity, loss_curves, passkey, plots
from selmerge_jax.evaluation.common import (
    ModelSource,
    check_fractions,
    check_positive_ints,
    load_model,
    provenance,
    rope_label,
    write_json,
)
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.main import loss_curve_sweep
from selmerge_jax.main.config import FinetuneConfig, PretrainConfig, load_experiment
from selmerge_jax.models.config import parameter_shape_changes
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig

__all__ = ["ReproductionConfig", "acceptance", "check_data", "failure", "main", "run_reproduction"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReproductionConfig:
    """``experiments/eval_reproduction.py``.

    Attributes:
      base_config, base_overrides, variants: the loss-curve family
      (``main.loss_curve_sweep.LossCurveSweepConfig``). crd_pair: the family variant the CRD run copies;
      crd_overrides: what it adds (``crd={...}``, ...). warm_start: overrides (on top of base_config +
      base_overrides) of a pretraining run ``warm`` that the
        CRD run and its twin both fine-tune from, the paper's recipe: a model that already retrieves at a
        shorter context is fine-tuned at the training length with and without CRD NTK (a 25M byte model does
        not learn retrieval from scratch at 2K within a device call; at 1K it does). Empty: both start from
        scratch and the twin is the family's ``crd_pair`` run itself.
      passkey_lengths, passkey_depths, passkey_per_cell, passkey_chunk_size: the grid (prompt tokens incl.
        the answer; depth 0 = start); passkey_rope: the twin's inference rule (null: the CRD run's);
        passkey_scoring: "forward" (one teacher-forced pass with the trained attention; the default, since
        the cached decode path attends densely) or "generate" (greedy decode through the cache).
      fidelity_variant: the run whose checkpoint the fidelity study decodes; fidelity_*: its prompts;
        compressions: the settings compared with the full cache; empty skips the fidelity stage (and the
          passkey stage then keeps no time for it).
      budget_s: wall-clock seconds for everything; train_min_s: expected seconds of one training run;
        eval_reserve_s: seconds kept for stages 2-3 when deciding to start a training run; passkey_min_s,
        fidelity_min_s: seconds one passkey length (both models) and one fidelity setting need to start.
      run_dir: checkpoints and metrics of the runs (large: keep out of output_dir); output_dir: JSON/PNG/MD.
    """

    base_config: str = "demo"
    base_overrides: tuple[str, ...] = ()
    variants: dict = dataclasses.field(default_factory=dict)
    crd_pair: str = ""
    crd_overrides: tuple[str, ...] = ()
    warm_start: tuple[str, ...] = ()
    passkey_lengths: tuple[int, ...] = (512, 1024)
    passkey_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    passkey_per_cell: int = 2
    passkey_chunk_size: int = 256
    passkey_rope: RopeConfig | None = None
    passkey_scoring: str = "forward"
    fidelity_variant: str = ""
    fidelity_prompt_tokens: int = 512
    fidelity_num_prompts: int = 4
    fidelity_max_new_tokens: int = 64
    fidelity_chunk_size: int = 64
    compressions: tuple[KVCompressionConfig, ...] = (KVCompressionConfig(policy="h2o", ratio=0.2),)
    budget_s: float = 540.0
    train_min_s: float = 60.0
    eval_reserve_s: float = 120.0
    passkey_min_s: float = 20.0
    fidelity_min_s: float = 15.0
    run_dir: str = "runs/reproduction"
    output_dir: str = "runs/reproduction/results"

    def __post_init__(self):
        own = "ReproductionConfig"
        loss_curve_sweep.LossCurveSweepConfig(variants=self.variants)  # validates names and override lists
        for name in ("crd_pair", "fidelity_variant"):
            if getattr(self, name) not in self.variants:
                raise ValueError(f"{own}.{name}={getattr(self, name)!r} must name one of the variants "
                                 f"{sorted(self.variants)}")
        taken = {"crd", "warm"} & set(self.variants)
        if taken:
            raise ValueError(f"{own}.variants may not be named {sorted(taken)}: the CRD "
                             "run and the warm start "
                             "train into those run directories")
        if not any(o.startswith(("crd=", "crd.")) for o in self.crd_overrides):
            raise ValueError(f"{own}.crd_overrides must set the crd section (e.g. 'crd={{cycle: 32768}}'), "
                             f"got {self.crd_overrides!r}")
        check_positive_ints(own, "passkey_lengths", self.passkey_lengths, minimum=64)
        check_fractions(own, "passkey_depths", self.passkey_depths)
        if self.passkey_scoring not in passkey.SCORING_MODES:
            raise ValueError(f"{own}.passkey_scoring={self.passkey_scoring!r}; allowed: "
                             f"{passkey.SCORING_MODES}")
        for name in ("passkey_per_cell", "passkey_chunk_size"):
            check_positive_ints(own, name, [getattr(self, name)])
        if self.compressions:
            fidelity.FidelityEvalConfig(model=None, init=InitConfig(kind="checkpoint", path="-"),
                                        **self._fidelity_kw())
        for name in ("budget_s", "train_min_s", "eval_reserve_s", "passkey_min_s", "fidelity_min_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{own}.{name} must be a number >= 0 (seconds), got {value!r}")

    def _fidelity_kw(self) -> dict:
        return {"prompt_tokens": self.fidelity_prompt_tokens, "num_prompts": self.fidelity_num_prompts,
                "max_new_tokens": self.fidelity_max_new_tokens, "chunk_size": self.fidelity_chunk_size,
                "compressions": self.compressions}

    @property
    def sweep(self) -> loss_curve_sweep.LossCurveSweepConfig:
        return loss_curve_sweep.LossCurveSweepConfig(base_config=self.base_config,
                                                     base_overrides=self.base_overrides,
                                                variants=self.variants, output_dir=self.run_dir)

    def _init(self) -> list[str]:
        if not self.warm_start:
            return ["init.kind=scratch"]
        return ["init.kind=checkpoint", f"init.path={_checkpoints(self.run_dir, 'warm')}"]

    def crd_config(self, extra: tuple[str, ...] = (), name: str = "crd") -> FinetuneConfig:
        """The CRD run's config; ``extra`` overrides go last and the run trains into ``<run_dir>/<name>`` (a
        sweep over CRD schedules from the same warm start,
        ``experiments/benchmarks/crd_passkey_sweep.py``)."""
        overrides = [*self.base_overrides, *self.variants[self.crd_pair], *self.crd_overrides, *self._init(),
                     *extra, f"train.output_dir={os.path.join(self.run_dir, name)}"]
        return load_experiment(FinetuneConfig, self.base_config, overrides)

    def warm_config(self):
        """The shared starting point of the CRD run and its twin (None without ``warm_start``)."""
        if not self.warm_start:
            return None
        overrides = [*self.base_overrides, *self.warm_start,
                     f"train.output_dir={os.path.join(self.run_dir, 'warm')}"]
        warm = load_experiment(PretrainConfig, self.base_config, overrides)
        # Both fine-tunes restore warm's weights: a shape they do not share fails here, not after warm has
        # trained.
        for name, run in ((self.crd_pair, self.variant_config(self.crd_pair)), ("crd", self.crd_config())):
            changed = parameter_shape_changes(warm.model, run.model)
            if changed:
                raise ValueError("ReproductionConfig.warm_start: the warm model and the "
                                 f"{name!r} run that fine-tunes "
                                 f"from it differ in parameter shapes (warm, {name}): {changed}")
        return warm

    def variant_config(self, name: str, extra: tuple[str, ...] = ()):
        """A family run's config; with ``warm_start`` the CRD twin fine-tunes from ``warm`` exactly as the CRD
        run does, minus CRD NTK (``extra`` overrides go last, as in ``crd_config``; only for that twin)."""
        if name != self.crd_pair or not self.warm_start:
            if extra:
                raise ValueError("ReproductionConfig.variant_config: extra overrides "
                                 f"{list(extra)} only apply to "
                                 f"the warm-started twin {self.crd_pair!r}, not to {name!r}")
            return loss_curve_sweep.variant_config(self.sweep, name)
        overrides = [*self.base_overrides, *self.variants[name], *self._init(), *extra,
                     f"train.output_dir={os.path.join(self.run_dir, name)}"]
        return load_experiment(FinetuneConfig, self.base_config, overrides)


class _Clock:
    """Seconds left of the budget, and the stage log that goes into study.json."""

    def __init__(self, budget_s: float):
        self.start, self.budget, self.log = time.monotonic(), budget_s, []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def allows(self, stage: str, need_s: float) -> bool:
        ok = self.left() > need_s
        if not ok:
            self.log.append({"stage": stage, "skipped": True, "left_s": round(self.left(), 1),
                             "needed_s": need_s})
        return ok

    def done(self, stage: str, t0: float, **extra):
        self.log.append({"stage": stage, "seconds": round(time.monotonic() - t0, 1), **extra})

    def failed(self, stage: str, t0: float, error: BaseException):
        # One-shot device runs: a failing stage is recorded and the next one still runs.
        _log.exception("stage %s failed", stage)
        self.log.append({"stage": stage, "failed": f"{type(error).__name__}: {error}"[:2000],
                         "seconds": round(time.monotonic() - t0, 1)})


def _checkpoints(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, name, "checkpoints")


def _train_family(cfg: ReproductionConfig, clock: _Clock, status: dict) -> dict:
    """Stage 1; returns the rows of the family (the CRD run's row goes to ``status['crd_run']``)."""
    configs = {name: cfg.variant_config(name) for name in cfg.variants}
    configs["crd"] = cfg.crd_config()  # fails on a typo before anything trains
    warm = cfg.warm_config()
    if warm is not None:
        configs["warm"] = warm
    order = [*(["warm"] if warm is not None else []), cfg.crd_pair, "crd",
             *[n for n in cfg.variants if n != cfg.crd_pair]]
    runs = {}
    for name in order:
        if not clock.allows(f"train {name}", cfg.train_min_s + cfg.eval_reserve_s):
            continue
        t0 = time.monotonic()
        try:
            row = loss_curve_sweep.run_variant(configs[name])
        except Exception as e:  # noqa: BLE001 (recorded in study.json)
            clock.failed(f"train {name}", t0, e)
            continue
        clock.done(f"train {name}", t0, final_val_loss=row["final_val_loss"],
                   tokens_per_s=row["tokens_per_s"])
        _copy_metrics(cfg, name)
        if name in ("crd", "warm"):
            status[f"{name}_run"] = row
        else:
            runs[name] = row
            _write_family(cfg, runs)
        _write_status(cfg, clock, status, runs)
    return runs


def _copy_metrics(cfg: ReproductionConfig, name: str):
    src = os.path.join(cfg.run_dir, name, "metrics.jsonl")
    if os.path.exists(src):
        os.makedirs(os.path.join(cfg.output_dir, "metrics"), exist_ok=True)
        shutil.copy(src, os.path.join(cfg.output_dir, "metrics", f"{name}.jsonl"))


def _write_family(cfg: ReproductionConfig, runs: dict):
    result = {"study": "loss_curves", "base_config": cfg.base_config,
              "base_overrides": list(cfg.base_overrides),
              "variants": {k: list(v) for k, v in cfg.variants.items()}, "runs": runs,
              "warm_started": [cfg.crd_pair] if cfg.warm_start else [], **provenance()}
    write_json(os.path.join(cfg.output_dir, "loss_curves.json"), result)
    warm = lambda n: ", from warm" if cfg.warm_start and n == cfg.crd_pair else ""  # a head start: say so
    label = lambda n: f"{n} (attended {runs[n]['attended_fraction']:.2f}{warm(n)})"
    train = {label(n): (r["curve"]["step"], r["curve"]["loss"]) for n, r in runs.items()}
    val = {label(n): (r["curve"]["val_step"], r["curve"]["val_loss"]) for n, r in runs.items()
           if r["curve"]["val_step"]}
    tokens = next(iter(runs.values()))["tokens"]
    plots.curves(os.path.join(cfg.output_dir, "loss_curves.png"), train, val,
                 title=f"loss curves, {tokens:,} tokens per run")
    with open(os.path.join(cfg.output_dir, "loss_curves.md"), "w", encoding="utf-8") as f:
        f.write(loss_curves.summary_table(runs) + "\n")


def _passkey_models(cfg: ReproductionConfig) -> dict:
    """name -> model: the CRD run (its own inference rule) and its twin (``passkey_rope`` or the same
    rule)."""
    crd_src = ModelSource(init=InitConfig(kind="checkpoint", path=_checkpoints(cfg.run_dir, "crd")))
    crd_model = load_model(crd_src)
    rope = cfg.passkey_rope or crd_model.config.rope
    twin_src = ModelSource(init=InitConfig(kind="checkpoint", path=_checkpoints(cfg.run_dir, cfg.crd_pair)),
                           rope=rope)
    return {"crd": crd_model, cfg.crd_pair: load_model(twin_src)}


def _empty_grid(cfg: ReproductionConfig, model) -> dict:
    return {"study": "passkey", "attention": model.config.attention,
            "rope": dataclasses.asdict(model.config.rope),
            "depths": list(cfg.passkey_depths), "per_cell": cfg.passkey_per_cell,
            "scoring": cfg.passkey_scoring,
            "lengths": [], "columns": [],
            "examples": [], "seconds_per_length": [], **provenance()}


def _add_column(grid: dict, part: dict):
    grid["lengths"] += part["lengths"]
    grid["columns"].append([row[0] for row in part["accuracy"]])  # one length: [depth][1] -> [depth]
    grid["examples"] += part["examples"]
    grid["seconds_per_length"] += part["seconds_per_length"]
    grid["accuracy"] = np.asarray(grid["columns"]).T.tolist()  # [depth][length]
    grid["mean_accuracy"] = float(np.mean(grid["accuracy"]))
    grid["accuracy_per_length"] = dict(zip([str(n) for n in grid["lengths"]],
                                           np.mean(grid["columns"], axis=1).tolist(), strict=True))


def _write_grid(cfg: ReproductionConfig, name: str, grid: dict):
    write_json(os.path.join(cfg.output_dir, f"passkey_{name}.json"), grid)
    label = rope_label(grid["rope"])
    plots.heatmap(os.path.join(cfg.output_dir, f"passkey_{name}.png"), grid["accuracy"], rows=grid["depths"],
                  cols=grid["lengths"], row_label="key depth (0 = start)", col_label="context tokens",
                  title=f"passkey, {name} ({grid['attention']}, RoPE {label})")


def _passkey_stage(cfg: ReproductionConfig, clock: _Clock, status: dict, data: DataConfig):
    if not os.path.isdir(_checkpoints(cfg.run_dir, "crd")) or not os.path.isdir(
            _checkpoints(cfg.run_dir, cfg.crd_pair)):
        clock.log.append({"stage": "passkey", "skipped": True, "why": "a passkey model did not train"})
        return
    models = _passkey_models(cfg)
    # the runs' own tokenizer: prompts in another one are noise to them
    tokenizer = load_tokenizer(data.tokenizer)
    grids = {name: _empty_grid(cfg, m) for name, m in models.items()}
    status["passkey_rope"] = {name: g["rope"] for name, g in grids.items()}
    for j, length in enumerate(cfg.passkey_lengths):
        # keep time for one fidelity setting after this length (pk8 lost its grid to a large fidelity_min_s
        # meant to skip fidelity: an empty ``compressions`` is the way to do that)
        reserve = cfg.fidelity_min_s if cfg.compressions else 0.0
        if not clock.allows(f"passkey {length}", cfg.passkey_min_s + reserve):
            continue
        t0 = time.monotonic()
        try:
            for name, model in models.items():
                part = passkey.passkey_accuracy(model, tokenizer, [length], cfg.passkey_depths,
                                                per_cell=cfg.passkey_per_cell, seed=j,
                                                chunk_size=cfg.passkey_chunk_size,
                                                scoring=cfg.passkey_scoring)
                _add_column(grids[name], part)
                _write_grid(cfg, name, grids[name])
        except Exception as e:  # noqa: BLE001 (recorded in study.json)
            clock.failed(f"passkey {length}", t0, e)
            break  # longer prompts would fail the same way (memory), and the grids must stay aligned
        clock.done(f"passkey {length}", t0,
                   **{n: g["accuracy_per_length"][str(length)] for n, g in grids.items()})
        status["passkey"] = {n: g["accuracy_per_length"] for n, g in grids.items()}
        _write_status(cfg, clock, status, None)


def _fidelity_stage(cfg: ReproductionConfig, clock: _Clock, status: dict):
    if not cfg.compressions:
        clock.log.append({"stage": "fidelity", "skipped": True, "why": "no compressions configured"})
        return
    path = _checkpoints(cfg.run_dir, cfg.fidelity_variant)
    if not os.path.isdir(path):
        clock.log.append({"stage": "fidelity", "skipped": True,
                          "why": f"{cfg.fidelity_variant} did not train"})
        return
    if not clock.allows("fidelity", 2 * cfg.fidelity_min_s):  # the uncompressed reference plus one setting
        return
    t0 = time.monotonic()
    # the data that run trained on
    data = loss_curve_sweep.variant_config(cfg.sweep, cfg.fidelity_variant).data
    fcfg = fidelity.FidelityEvalConfig(init=InitConfig(kind="checkpoint", path=path), data=data,
                                       output_dir=cfg.output_dir, **cfg._fidelity_kw())
    try:
        result = fidelity.run_fidelity(fcfg, stop=lambda: clock.left() < cfg.fidelity_min_s)
    except Exception as e:  # noqa: BLE001 (recorded in study.json)
        clock.failed("fidelity", t0, e)
        return
    status["fidelity_table"] = result["table"]
    clock.done("fidelity", t0)


def acceptance(runs: dict, crd_passkey: dict | None, seq_len: int | None) -> dict:
    """The issue's checks from the figures: (a), (b), (c) as booleans (None when the figures are missing)."""
    out = {"a": None, "b": None, "c": None}
    val = {n: r["final_val_loss"] for n, r in runs.items() if r.get("final_val_loss") is not None}
    dense = [val[n] for n in val if runs[n]["attention"] == "dense"]
    sparse = {n: val[n] for n in val if runs[n]["attention"] != "dense"
              and runs[n]["attended_fraction"] <= 1 / 8}
    if dense and sparse:
        gap = {n: v / dense[0] - 1 for n, v in sparse.items()}
        out["a"] = {"pass": min(gap.values()) <= 0.03, "relative_gap_to_dense": gap}
    out["b"] = loss_curves.ordered(runs, "final_val_loss")
    if crd_passkey and seq_len:
        key = str(16 * seq_len)
        if key in crd_passkey:
            out["c"] = {"pass": crd_passkey[key] >= 0.95, "length": 16 * seq_len,
                        "accuracy": crd_passkey[key]}
    return out


def _write_status(cfg: ReproductionConfig, clock: _Clock, status: dict, runs: dict | None):
    if runs is not None:
        status["family"] = {n: {k: r[k]
                                for k in ("attention", "attended_fraction", "final_val_loss", "tokens",
                                                    "tokens_per_s", "params")} for n, r in runs.items()}
    status["stages"], status["elapsed_s"] = clock.log, round(clock.budget - clock.left(), 1)
    # A warm-started twin had a pretraining run before its fine-tune, the other variants start from scratch:
    # its validation loss is no like-for-like point for (a)/(b), so it stays in the family rows but not in the
    # checks.
    family = {n: dict(r) for n, r in status.get("family", {}).items()
              if not (cfg.warm_start and n == cfg.crd_pair)}
    status["acceptance"] = acceptance(family, (status.get("passkey") or {}).get("crd"), status.get("seq_len"))
    write_json(os.path.join(cfg.output_dir, "study.json"), status)


def check_data(cfg: ReproductionConfig) -> None:
    """Raises FileNotFoundError (one line: the missing files and the command that writes them) when a run's
    pre-tokenized ``.npy`` files are absent, before any stage starts."""
    configs = [cfg.variant_config(name) for name in cfg.variants] + [cfg.crd_config()]
    warm = cfg.warm_config()
    runs = [*configs, *([warm] if warm else [])]
    paths = {p for c in runs for p in (c.data.train_npy, c.data.validation_npy)}
    missing = sorted(p for p in paths if p is not None and not os.path.exists(os.path.expanduser(p)))
    if missing:
        folder = os.path.dirname(missing[0]) or "."
        raise FileNotFoundError(
            f"the runs read pre-tokenized data that is missing: {', '.join(missing)}; write it with `python "
            f"experiments/pretrain.py --config experiments/configs/demo.yaml --export-npy {folder}` (the "
            f"embedded stdlib corpus, built locally) or point data.train_npy/validation_npy elsewhere")


def failure(status: dict) -> str | None:
    """One line naming the stages that failed (their first error line), or None when none did: the command
    exits non-zero with it."""
    failed = [s for s in status.get("stages", []) if "failed" in s]
    if not failed:
        return None
    first = (failed[0]["failed"].strip().splitlines() or ["?"])[0]
    others = ", ".join(s["stage"] for s in failed[1:])
    more = f" (and {len(failed) - 1} more: {others})" if others else ""
    return f"stage {failed[0]['stage']!r} failed: {first}{more}; details in study.json and the log above"


def run_reproduction(cfg: ReproductionConfig) -> dict:
    """Runs the three stages inside ``cfg.budget_s``; returns study.json's content. Missing data fails at once
    (``check_data``); a failing stage is recorded and the next one still runs (``failure`` sums them up)."""
    check_data(cfg)
    clock = _Clock(cfg.budget_s)
    pair = cfg.variant_config(cfg.crd_pair)
    status = {"study": "reproduction", "seq_len": pair.train.seq_len, "budget_s": cfg.budget_s,
              **provenance()}
    os.makedirs(cfg.output_dir, exist_ok=True)
    runs = _train_family(cfg, clock, status)
    _passkey_stage(cfg, clock, status, pair.data)
    _fidelity_stage(cfg, clock, status)
    _write_status(cfg, clock, status, runs)
    return status


def main(config: ReproductionConfig) -> dict:
    """:func:`run_reproduction`: study.json's content."""
    return run_reproduction(config)
