"""Issue #7 (c) on one GPU: several CRD NTK fine-tunes from one warm start, trained side by side, then the
passkey grid on each under several inference rules, also side by side.

The reproduction pipeline (``main.reproduce``) trains one CRD run and its twin in sequence; a 25M
model leaves most of an H100 idle, so this sweep runs them as concurrent processes (each with its own slice of
GPU memory, ``mem_fraction``) to compare CRD schedules (fixed scale, scale grown in stages, cycle lengths,
seeds) within one device call. Every run is the reproduction config's CRD fine-tune (or its twin, when the
run is named like ``crd_pair``) plus the run's own overrides, trained into ``<run_dir>/<name>``.

    python experiments/benchmarks/crd_passkey_sweep.py --config experiments/benchmarks/crd_sweep_h100.yaml \
        --stage all --out runs/crd_sweep/results --max_s 560

Stages: ``train`` (warm start if its checkpoint is missing, alone; then the runs, ``jobs`` at a time) and
``score`` (each entry of ``scores``: one run under one RoPE rule, ``eval_passkey`` into ``<out>/<tag>/``).
Finished runs and scores are skipped, so a second call resumes where a first one was cut off; whatever is
still running at ``--max_s`` is stopped. ``<out>/summary.json``: accuracy per length for every score, and the
log of every job (seconds, exit code).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

# appended, not first: the repo root holds `kernels/`, which would shadow the installed `kernels` package
# that transformers imports
sys.path.append(os.path.join(os.path.dirname(__file__), "..", ".."))
from selmerge_jax.main.config import load_experiment

_SCORE_KEYS = {"run", "tag", "rope", "lengths", "per_cell"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CRDSweepConfig:
    """Attributes:
      reproduction: a ``ReproductionConfig`` YAML with ``warm_start``: the base recipe, the warm start, the
        CRD fine-tune and its twin (``crd_pair``).
      reproduction_overrides: ``key.path=value`` changes of that config (e.g. a longer ``warm_start``).
      run_dir: replaces the reproduction's run_dir (warm and every run train under it).
      runs: name -> extra overrides of the CRD fine-tune; the name ``crd_pair`` (e.g. ``dense``) is the twin.
      scores: ``{run, tag, rope, lengths, per_cell}`` entries in priority order; ``rope`` a RopeConfig mapping
        or null (the checkpoint's own rule); ``lengths`` and ``per_cell`` replace the sweep's own (e.g. a 64x
        stretch for one rule, with fewer prompts so that one batch fits in memory).
      figure: panel title -> score tags drawn as one heat map (their columns merged by length), the panels
        side by side in ``<out>/side_by_side.png`` (the CRD run next to its twin).
      lengths, depths, per_cell, chunk_size: the passkey grid (greedy decoding through the cache).
      jobs: processes at once; mem_fraction: GPU memory fraction of each (XLA_PYTHON_CLIENT_MEM_FRACTION).
    """

    reproduction: str
    reproduction_overrides: tuple[str, ...] = ()
    run_dir: str = "runs/crd_sweep"
    runs: dict = dataclasses.field(default_factory=dict)
    scores: tuple[dict, ...] = ()
    lengths: tuple[int, ...] = (2048, 8192, 32768)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_cell: int = 4
    chunk_size: int = 512
    jobs: int = 4
    mem_fraction: float = 0.22
    figure: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for i, s in enumerate(self.scores):
            if not isinstance(s, dict) or set(s) - _SCORE_KEYS or not {"run", "tag"} <= set(s):
                raise ValueError(f"CRDSweepConfig.scores[{i}] must be a mapping with run, tag and optionally "
                                 f"rope, lengths, per_cell; got {s!r}")
            if s["run"] not in self.runs:
                raise ValueError(f"CRDSweepConfig.scores[{i}].run={s['run']!r} is not one of runs "
                                 f"{sorted(self.runs)}")
        bad = [n for n in self.runs if n == "warm" or not n or "/" in n]
        if bad:
            raise ValueError(f"CRDSweepConfig.runs: names {bad} are not allowed (each "
                             "names a directory under "
                             "run_dir beside the shared warm start, 'warm')")
        tags = [s["tag"] for s in self.scores]
        if len(set(tags)) != len(tags):
            raise ValueError(f"CRDSweepConfig.scores: tags must be unique (they name directories), "
                             f"got {tags}")
        for title, panel in self.figure.items():
            unknown = set(panel) - set(tags)
            if not panel or unknown:
                raise ValueError(f"CRDSweepConfig.figure[{title!r}] must list score tags, got {panel!r} "
                                 f"(unknown: {sorted(unknown)})")
        if not 0 < self.mem_fraction <= 1 or self.jobs < 1:
            raise ValueError("CRDSweepConfig: jobs must be >= 1 and mem_fraction in (0, "
                             f"1], got jobs={self.jobs}, "
                             f"mem_fraction={self.mem_fraction}")

    def reproduction_config(self):
        from selmerge_jax.main.reproduce import ReproductionConfig

        rep = load_experiment(ReproductionConfig, self.reproduction, [*self.reproduction_overrides,
                              f"run_dir={self.run_dir}", f"output_dir={self.run_dir}/results"])
        if not rep.warm_start:
            raise ValueError(f"CRDSweepConfig.reproduction={self.reproduction!r} has no "
                             "warm_start: every run of "
                             "the sweep fine-tunes from the same warm checkpoint")
        return rep

    def train_config(self, name: str, rep=None):
        """The training config of ``warm`` or a run (``rep``: the reproduction config, if already built)."""
        rep = rep or self.reproduction_config()
        if name == "warm":
            return rep.warm_config()
        extra = tuple(self.runs[name] or ())
        if name == rep.crd_pair:
            return rep.variant_config(name, extra)
        return rep.crd_config(extra, name)

    def train_configs(self) -> dict:
        """name -> training config of warm and every run, from one reproduction config (building them
        validates them)."""
        rep = self.reproduction_config()
        return {name: self.train_config(name, rep) for name in ("warm", *self.runs)}

    def final_steps(self) -> dict:
        """name -> training steps of warm and every run."""
        return {name: c.train.steps for name, c in self.train_configs().items()}


def _finished(run_dir: str, name: str, steps: int) -> bool:
    """A run is done when its checkpoint directory holds its *final* step, committed (orbax renames a step
    into place); an intermediate step left by a run stopped at the deadline does not count."""
    path = os.path.join(run_dir, name, "checkpoints")
    return os.path.isdir(path) and str(steps) in os.listdir(path)


def _stale_runs(run_dir: str, configs: dict, done) -> dict:
    """Finished runs in run_dir whose stored config is not the one this sweep would train (``configs``: name
    -> config, e.g. after a change of reproduction_overrides): name -> changed keys. They would be skipped,
    and scored, as if they were new."""
    from selmerge_jax.main.config import config_to_dict
    from selmerge_jax.training.checkpoint import config_changes, stored_meta

    stale = {}
    for name, config in configs.items():
        if done(name):
            meta = stored_meta(os.path.join(run_dir, name, "checkpoints"), config.train.steps)
            changed = config_changes(meta.get("config", {}), config_to_dict(config))
            if changed:
                stale[name] = changed
    return stale


def _child_train(cfg: CRDSweepConfig, name: str):
    from selmerge_jax.main import loss_curve_sweep

    row = loss_curve_sweep.run_variant(cfg.train_config(name))
    print(json.dumps({"run": name, "final_train_loss": row["final_train_loss"],
                      "final_val_loss": row["final_val_loss"], "tokens_per_s": row["tokens_per_s"]}))


def _child_score(cfg: CRDSweepConfig, tag: str, out: str):
    from selmerge_jax.evaluation.passkey import PasskeyEvalConfig, run_passkey
    from selmerge_jax.positional import RopeConfig
    from selmerge_jax.training.checkpoint import InitConfig

    entry = next(s for s in cfg.scores if s["tag"] == tag)
    rope = entry.get("rope")
    pk = PasskeyEvalConfig(init=InitConfig(kind="checkpoint",
                                           path=os.path.join(cfg.run_dir, entry["run"], "checkpoints")),
                           model=None, rope=RopeConfig(**rope) if rope else None,
                           lengths=tuple(entry.get("lengths") or cfg.lengths),
                           depths=cfg.depths, per_cell=entry.get("per_cell") or cfg.per_cell,
                           chunk_size=cfg.chunk_size,
                           scoring="generate", output_dir=os.path.join(out, tag))
    print(json.dumps(run_passkey(pk)))


class _Pool:
    """Child processes of this script, ``jobs`` at a time, stopped at the deadline; logs each one."""

    def __init__(self, argv: list[str], out: str, deadline: float):
        self.argv, self.out, self.deadline, self.log, self.stopped = argv, out, deadline, [], set()

    def _stop(self, running: dict, grace_s: float = 30.0):
        """SIGTERM to every child still running, then SIGKILL to any that outlives the shared grace period."""
        for job, (proc, _, _) in running.items():
            if proc.poll() is None and job not in self.stopped:
                proc.terminate()
                self.stopped.add(job)
        end = time.monotonic() + grace_s
        for proc, _, _ in running.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, jobs: list[str], width: int, mem_fraction: float):
        pending, running = list(jobs), {}
        while pending or running:
            while pending and len(running) < width and time.monotonic() < self.deadline:
                job = pending.pop(0)
                env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{mem_fraction:.3f}"}
                log_path = os.path.join(self.out, "logs", job.replace(":", "_") + ".log")
                logf = open(log_path, "w")  # noqa: SIM115
                proc = subprocess.Popen([*self.argv, "--child", job], env=env, stdout=logf,
                                        stderr=subprocess.STDOUT)
                running[job] = (proc, logf, time.monotonic())
                print(f"[sweep] start {job}", flush=True)
            if not running:
                break  # deadline reached with jobs left
            time.sleep(1.0)
            if time.monotonic() > self.deadline:
                self._stop(running)
            for job, (proc, logf, t0) in list(running.items()):
                if proc.poll() is not None:
                    logf.close()
                    del running[job]
                    entry = {"job": job, "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
                             "stopped_at_deadline": job in self.stopped}
                    self.log.append(entry)
                    print(f"[sweep] {entry}", flush=True)
        self.log += [{"job": job, "skipped": "deadline"} for job in pending]


def _columns(out: str, tag: str) -> dict:
    """length -> accuracy per depth, from ``<out>/<tag>/passkey.json``."""
    with open(os.path.join(out, tag, "passkey.json")) as f:
        grid = json.load(f)
    return dict(zip(grid["lengths"], zip(*grid["accuracy"], strict=True), strict=True))  # [depth][length]


def _accuracy_per_length(columns: dict) -> dict:
    return {str(n): round(sum(c) / len(c), 3) for n, c in sorted(columns.items())}


def _figure(cfg: CRDSweepConfig, out: str) -> dict:
    """Each panel's tags merged into one grid (a later tag wins a length both have); draws side_by_side.png
    and returns each panel's accuracy per length."""
    from selmerge_jax.evaluation import plots

    merged = {}
    for title, tags in cfg.figure.items():
        columns = {}
        for tag in tags:
            if os.path.exists(os.path.join(out, tag, "passkey.json")):
                columns.update(_columns(out, tag))
        if columns:
            merged[title] = dict(sorted(columns.items()))
    if merged:
        panels = {title: (np.asarray(list(c.values())).T, list(c)) for title, c in merged.items()}
        plots.heatmaps(os.path.join(out, "side_by_side.png"), panels, rows=list(cfg.depths),
                       row_label="key depth (0 = start)", col_label="context tokens",
                       title="passkey retrieval (greedy decoding)")
    return {title: _accuracy_per_length(c) for title, c in merged.items()}


def _summary(cfg: CRDSweepConfig, out: str, log: list, steps: dict) -> dict:
    scores = {}
    for s in cfg.scores:
        if os.path.exists(os.path.join(out, s["tag"], "passkey.json")):
            scores[s["tag"]] = {"run": s["run"], "rope": s.get("rope"),
                                "accuracy": _accuracy_per_length(_columns(out, s["tag"]))}
    runs = {}
    for name in ["warm", *cfg.runs]:
        metrics = os.path.join(cfg.run_dir, name, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                rows = [json.loads(line) for line in f]
            train = [r for r in rows if "loss" in r]
            runs[name] = {"steps": train[-1]["step"] if train else 0, "final_train_loss": train[-1]["loss"]
                          if train
                          else None, "finished": _finished(cfg.run_dir, name, steps[name])}
    summary = {"config": dataclasses.asdict(cfg), "runs": runs, "scores": scores, "figure": _figure(cfg, out),
               "jobs": log}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], help="key.path=value override of the sweep config")
    p.add_argument("--stage", choices=("train", "score", "all", "report"), default="all",
                   help="report: only summary.json and side_by_side.png from the scores already written")
    p.add_argument("--out", default="runs/crd_sweep/results")
    p.add_argument("--max_s", type=float, default=560.0, help="stop every child still running after this")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    cfg = load_experiment(CRDSweepConfig, a.config, a.set)
    if a.child:
        kind, name = a.child.split(":", 1)
        return _child_train(cfg, name) if kind == "train" else _child_score(cfg, name, a.out)
    import jax

    jax.config.update("jax_platforms", "cpu")  # the coordinator must not take GPU memory its children need
    configs = cfg.train_configs()  # a typo fails here, before any child starts
    steps = {name: c.train.steps for name, c in configs.items()}
    done = lambda name: _finished(cfg.run_dir, name, steps[name])
    stale = _stale_runs(cfg.run_dir, configs, done)
    if stale:
        raise SystemExit(f"{cfg.run_dir} holds finished runs trained under another config "
                         f"(changed keys: {stale}); "
                         "delete them or set run_dir elsewhere")
    if a.stage == "report" and not os.path.isdir(a.out):
        raise SystemExit(f"--stage report: {a.out} holds no scores")
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    argv = [sys.executable, os.path.abspath(__file__), "--config", a.config, "--out", a.out,
            *[f"--set={s}" for s in a.set]]
    pool = _Pool(argv, a.out, time.monotonic() + a.max_s)
    if a.stage in ("train", "all"):
        if not done("warm"):
            pool.run(["train:warm"], 1, 0.9)
        pool.run([f"train:{n}" for n in cfg.runs if not done(n)], cfg.jobs, cfg.mem_fraction)
    if a.stage in ("score", "all"):
        todo = [s["tag"] for s in cfg.scores if done(s["run"])
                and not os.path.exists(os.path.join(a.out, s["tag"], "passkey.json"))]
        pool.run([f"score:{t}" for t in todo], cfg.jobs, cfg.mem_fraction)
    summary = _summary(cfg, a.out, pool.log, steps)
    for tag, s in summary["scores"].items():
        print(f"{tag:28s} {s['run']:12s} {s['accuracy']}")


if __name__ == "__main__":
    main()
