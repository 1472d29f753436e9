"""Several processes, one JAX job (``main.launch_local``: CPU processes with forced host devices, as the hosts
of a GPU cluster or TPU slice would be).

The acceptance test trains a tiny select-and-merge model with the MS ring over a sequence axis that crosses
the two processes, loses one process to SIGKILL during a save (the survivor stops within the heartbeat
timeout, the previous step stays intact), resumes with one process on a (data=2, seq=2) mesh and matches a
one-process reference run: the same losses and the same batches in the same order. A persistent compilation
cache lets the resumed run reuse the reference's compiled step.
"""

import io
import json
import os
import pathlib
import re
import sys

import numpy as np
import pytest

from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.main.launch_local import LaunchConfig
from selmerge_jax.main.launch_local import main as launch
from selmerge_jax.training.metrics import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
WORKER = ROOT / "tests" / "fixtures" / "multihost_worker.py"
STEPS = 4
TINY = ["model.d_model=32", "model.ffn_dim=64", "model.num_layers=1", "model.attention=ring_ms",
        "model.ms.block_size=8", "model.ms.top_k=3", "train.seq_len=64", "train.batch_size=2",
        f"train.steps={STEPS}", "train.log_every=1", "train.eval_batches=0", "train.progress=false",
        "checkpoint.async_save=false", "checkpoint.every_steps=2", "mesh.heartbeat_timeout_s=10"]


@pytest.fixture
def npy_data(tmp_path):
    text = (ROOT / "selmerge_jax" / "training" / "loop.py").read_text() * 3
    tokens = ByteTokenizer().encode(text, add_bos=True, add_eos=True).astype(np.uint16)
    np.save(tmp_path / "train.npy", tokens)
    np.save(tmp_path / "validation.npy", tokens[: 4 * 65 * 2])
    return [f"data.train_npy={tmp_path / 'train.npy'}", f"data.validation_npy={tmp_path / 'validation.npy'}"]


def _job(tmp_path, name: str, processes: int, overrides: list[str], *, run_dir: str, env: dict | None = None,
         kill_others: bool = True) -> tuple[int, str]:
    """Runs the worker (experiments/pretrain.py plus probes) as one job; returns (status, its output)."""
    command = [sys.executable, str(WORKER), "--config", str(ROOT / "selmerge_jax/main/configs/demo.yaml")]
    for item in [*TINY, *overrides, f"train.output_dir={tmp_path / run_dir}"]:
        command += ["--set", item]
    (tmp_path / name).mkdir()
    # XLA_FLAGS as conftest set them (its fast CPU compile); the launcher replaces the device count
    base = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "SELMERGE_TEST_BATCH_LOG": str(tmp_path / name), **(env or {})}
    out = io.StringIO()
    config = LaunchConfig(command=tuple(command), processes=processes, devices_per_process=4 // processes,
                          timeout_s=150, kill_others=kill_others)
    status = launch(config, out=out, env=base)
    return status, out.getvalue()


def _batches(directory: pathlib.Path, process: int = 0) -> dict[int, list[str]]:
    lines = (directory / f"p{process}.jsonl").read_text().splitlines()
    return {row["step"]: row["rows"] for row in map(json.loads, lines)}


def _losses(run: pathlib.Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_jsonl(run / "metrics.jsonl", key="loss").items()}


def _exit_time(output: str, process: int) -> tuple[int, float]:
    status, seconds = re.search(rf"\[launch_local\] p{process} exited with status (-?\d+) after ([\d.]+) s",
                                output).groups()
    return int(status), float(seconds)


def test_two_processes_ring_ms_killed_mid_save_resume_on_one_process_match_the_reference(tmp_path, npy_data):
    # the reference: one process, four devices, (data=2, seq=2), from scratch
    status, out = _job(tmp_path, "ref", 1, [*npy_data, "mesh.data=2", "mesh.seq=2"], run_dir="ref")
    assert status == 0, out[-4000:]
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, STEPS + 1))

    # two processes x two devices, the ring of four crossing the process boundary; p1 dies entering the save
    # of the last step while p0 is inside it
    status, out = _job(tmp_path, "two", 2, [*npy_data, "mesh.data=1", "mesh.seq=4"], run_dir="run",
                       env={"SELMERGE_TEST_KILL_AT_SAVE": f"{STEPS}:1"}, kill_others=False)
    assert status != 0 and (tmp_path / "run" / "killed").exists(), out[-4000:]
    (victim, died), (survivor, stopped) = _exit_time(out, 1), _exit_time(out, 0)
    assert victim == -9 and survivor != 0, out[-4000:]
    assert stopped - died < 30, f"the survivor took {stopped - died:.1f} s to stop"
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2], f"finalized checkpoints {steps}: step 2 must stay, step {STEPS} must not appear"
    np.testing.assert_allclose([_losses(tmp_path / "run")[s] for s in (1, 2)], [reference[1], reference[2]],
                               rtol=1e-4)

    # one process x four devices, another mesh: resumes from step 2 (arrays resharded on restore)
    status, out = _job(tmp_path, "resumed", 1, [*npy_data, "mesh.data=2", "mesh.seq=2"], run_dir="run")
    assert status == 0, out[-4000:]
    summary = json.loads(re.search(r"SUMMARY (.*)", out).group(1))
    assert summary["resumed_from"] == 2 and summary["steps"] == STEPS
    losses = _losses(tmp_path / "run")  # the resumed run's lines come last and win
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=1e-4)

    # the same batches in the same order: each process of the two-process run read the whole batch (the
    # sequence axis crosses them), the resumed run continued where it stopped; nothing seen twice
    ref_batches = _batches(tmp_path / "ref")
    for process in (0, 1):
        two = _batches(tmp_path / "two", process)
        assert all(two[s] == ref_batches[s] for s in (1, 2, 3)), process
    resumed = _batches(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == ref_batches[s] for s in (3, 4))
    rows = [r for s in range(1, STEPS + 1) for r in ref_batches[s]]
    assert len(set(rows)) == len(rows)
