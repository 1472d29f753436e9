"""experiments/benchmarks/crd_passkey_sweep.py: the shipped H100 sweep builds every run's config from the
reproduction config it names; bad sweeps fail naming the field; a tiny sweep runs end to end on CPU."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from experiment_scripts import load_script
from xla_flags import FAST_CPU_COMPILE

from selmerge_jax.main.config import FinetuneConfig, PretrainConfig, load_experiment

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "crd_passkey_sweep.py"


sweep = load_script("benchmarks/crd_passkey_sweep.py")


def test_shipped_h100_sweep_builds_every_run():
    cfg = load_experiment(sweep.CRDSweepConfig, str(ROOT / "experiments/benchmarks/crd_sweep_h100.yaml"))
    warm = cfg.train_config("warm")
    assert type(warm) is PretrainConfig and warm.train.seq_len == 1024
    runs = {name: cfg.train_config(name) for name in cfg.runs}
    assert all(isinstance(r, FinetuneConfig) for r in runs.values())
    assert runs["dense"].crd is None  # the twin: the same fine-tune without CRD NTK
    for name, run in runs.items():
        assert run.init.path == os.path.join(cfg.run_dir, "warm", "checkpoints")
        assert run.train.output_dir == os.path.join(cfg.run_dir, name) and run.train.steps == 1200
    grow2 = runs["grow2"].crd
    assert (grow2.growth, grow2.stage_steps, grow2.inference_scale) == (2.0, 300, 129.0)
    assert runs["fixed16"].crd.growth == 1.0  # the reproduction config's own CRD schedule


def test_shipped_seed_repeats_build_a_longer_warm_start_and_seeded_runs():
    cfg = load_experiment(sweep.CRDSweepConfig,
                          str(ROOT / "experiments/benchmarks/crd_sweep_h100_seeds.yaml"))
    warm = cfg.train_config("warm")
    assert (warm.train.seq_len, warm.train.steps, warm.optimizer.learning_rate) == (1024, 3000, 0.001)
    runs = {name: cfg.train_config(name) for name in cfg.runs}
    twin = runs.pop("dense")
    assert twin.crd is None and twin.init.path == os.path.join(cfg.run_dir, "warm", "checkpoints")
    assert [r.train.seed for r in runs.values()] == [1, 2, 3]
    assert {(r.crd.growth, r.crd.inference_scale, r.train.seq_len)
            for r in runs.values()} == {(4.0, 257.0, 2048)}


def test_finished_runs_of_another_config_are_found(tmp_path):
    from selmerge_jax.main.config import config_to_dict

    cfg = load_experiment(sweep.CRDSweepConfig,
                          str(ROOT / "experiments/benchmarks/crd_sweep_h100_seeds.yaml"),
                          [f"run_dir={tmp_path}"])
    configs = cfg.train_configs()
    steps = {name: c.train.steps for name, c in configs.items()}
    stored = config_to_dict(configs["warm"])
    meta = tmp_path / "warm" / "checkpoints" / str(steps["warm"]) / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"kind": "pretrain", "config": stored}))
    done = lambda name: name == "warm"
    assert sweep._stale_runs(str(tmp_path), configs, done) == {}
    stored["optimizer"]["learning_rate"] = 0.01  # e.g. trained before reproduction_overrides changed
    (meta / "metadata").write_text(json.dumps({"kind": "pretrain", "config": stored}))
    assert sweep._stale_runs(str(tmp_path), configs, done) == {"warm": ["optimizer.learning_rate"]}


@pytest.mark.parametrize("change, message", [
    ({"scores": ({"run": "nope", "tag": "x"},)}, "scores\\[0\\].run='nope'"),
    ({"scores": ({"run": "a", "tag": "x"}, {"run": "a", "tag": "x"})}, "tags must be unique"),
    ({"scores": ({"run": "a", "tag": "x", "rule": 1},)}, "scores\\[0\\] must be a mapping"),
    ({"jobs": 0}, "jobs must be >= 1"),
    ({"runs": {"a": [], "warm": []}}, "names \\['warm'\\] are not allowed"),
])
def test_bad_sweeps_raise(change, message):
    with pytest.raises(ValueError, match=message):
        sweep.CRDSweepConfig(reproduction="-", **{"runs": {"a": []}, **change})


def test_reproduction_without_warm_start_is_refused():
    cfg = sweep.CRDSweepConfig(reproduction=str(ROOT / "experiments/configs/eval_reproduction_cpu.yaml"),
                               runs={"ms_k4": []})
    with pytest.raises(ValueError, match="no warm_start"):
        cfg.reproduction_config()


def test_only_the_final_checkpoint_step_finishes_a_run(tmp_path):
    """A run stopped at the deadline may leave an intermediate step: it must train again, not be scored."""
    cfg = load_experiment(sweep.CRDSweepConfig, str(ROOT / "experiments/benchmarks/crd_sweep_h100.yaml"),
                          [f"run_dir={tmp_path}"])
    steps = cfg.final_steps()
    assert steps == {"warm": 1800, "dense": 1200, "fixed16": 1200, "grow2": 1200, "grow4": 1200}
    done = lambda name: sweep._finished(str(tmp_path), name, steps[name])
    os.makedirs(tmp_path / "grow2" / "checkpoints" / "500")
    assert not done("grow2") and not done("grow4")
    os.makedirs(tmp_path / "grow2" / "checkpoints" / "1200")
    os.makedirs(tmp_path / "warm" / "checkpoints" / "1200")  # warm trains 1800 steps
    assert done("grow2") and not done("warm")


def test_rope_label_names_the_rule_and_log_n():
    from selmerge_jax.evaluation.common import rope_label
    from selmerge_jax.positional import RopeConfig

    assert rope_label(RopeConfig()) == "default"
    assert rope_label({"rope_type": "ntk", "factor": 257.0, "logn_length": 1024}) == "ntk x257, log-n 1024"


def _fake_score(out, tag, lengths, accuracy):
    os.makedirs(out / tag)
    (out / tag / "passkey.json").write_text(json.dumps({"lengths": lengths, "accuracy": accuracy}))


def test_report_merges_a_panels_scores_by_length_and_draws_them(tmp_path):
    """One panel's columns come from several scores (a later score wins a length both have)."""
    cfg = sweep.CRDSweepConfig(reproduction="-", runs={"a": [], "b": []}, depths=(0.0, 1.0),
                               scores=({"run": "a", "tag": "a1"}, {"run": "a", "tag": "a2"},
                                       {"run": "b", "tag": "b1"}),
                               figure={"with CRD": ["a1", "a2"], "twin": ["b1"]})
    _fake_score(tmp_path, "a1", [2048, 32768], [[1.0, 0.5], [1.0, 0.0]])
    _fake_score(tmp_path, "a2", [8192, 32768], [[1.0, 1.0], [0.5, 1.0]])
    _fake_score(tmp_path, "b1", [2048], [[1.0], [0.0]])
    merged = sweep._figure(cfg, str(tmp_path))
    assert merged == {"with CRD": {"2048": 1.0, "8192": 0.75, "32768": 1.0}, "twin": {"2048": 0.5}}
    assert (tmp_path / "side_by_side.png").stat().st_size > 0
    with pytest.raises(ValueError, match="figure\\['x'\\] must list score tags"):
        sweep.CRDSweepConfig(reproduction="-", runs={"a": []}, scores=({"run": "a", "tag": "a1"},),
                             figure={"x": ["a1", "zz"]})


def test_heatmaps_rejects_a_panel_of_the_wrong_shape(tmp_path):
    from selmerge_jax.evaluation import plots

    with pytest.raises(ValueError, match="panel 'p' has shape"):
        plots.heatmaps(str(tmp_path / "x.png"), {"p": ([[1.0, 0.0]], [1])}, rows=[0.5], row_label="d",
                       col_label="n", title="t")


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    """Warm start, a CRD run with a growing scale and the twin side by side, then one passkey score each; a
    second call finds everything done and only rewrites the summary."""
    import numpy as np

    from selmerge_jax.data.tokenizer import ByteTokenizer

    tokens = ByteTokenizer().encode((ROOT / "selmerge_jax/training/loop.py").read_text() * 4, add_bos=True)
    np.save(tmp_path / "train.npy", tokens.astype(np.uint16))
    np.save(tmp_path / "validation.npy", tokens[:4000].astype(np.uint16))
    rep = (ROOT / "experiments/configs/eval_reproduction_cpu.yaml").read_text()
    rep = rep.replace("model.ms.block_size=32,",
                      f"model.ms.block_size=32, data.train_npy={tmp_path}/train.npy, "
                      f"data.validation_npy={tmp_path}/validation.npy,")
    (tmp_path / "rep.yaml").write_text(rep + "warm_start: [train.steps=2]\n")
    crd = ("crd={theta: 10000.0, cycle: 768, original_max_position_embeddings: 384, initial_scale: 2.0, "
           "growth: 2.0, stage_steps: 1, inference_scale: 5.0}")
    (tmp_path / "sweep.yaml").write_text(json.dumps({
        "reproduction": str(tmp_path / "rep.yaml"), "run_dir": str(tmp_path / "runs"),
        "runs": {"ms_k4": ["train.steps=2"], "grow": ["train.steps=3", crd]},
        "scores": [{"run": "grow", "tag": "grow_a5", "rope": {"rope_type": "ntk", "factor": 5.0}},
                   {"run": "ms_k4", "tag": "twin"}],
        "lengths": [384], "depths": [0.5], "per_cell": 1, "chunk_size": 128, "jobs": 2,
        "figure": {"CRD": ["grow_a5"], "twin": ["twin"]}}))
    cmd = [sys.executable, str(SCRIPT), "--config", str(tmp_path / "sweep.yaml"), "--out",
           str(tmp_path / "out")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_CPU_COMPILE}
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["scores"]) == {"grow_a5", "twin"}
    assert summary["scores"]["grow_a5"]["accuracy"].keys() == {"384"}
    assert {n: r["finished"] for n, r in summary["runs"].items()} == {"warm": True, "ms_k4": True,
                                                                      "grow": True}
    assert summary["jobs"] == []  # the second call found every run trained and every score written
    assert (tmp_path / "out" / "twin" / "passkey.png").stat().st_size > 0
    assert set(summary["figure"]) == {"CRD", "twin"} and (tmp_path / "out" / "side_by_side.png").exists()
