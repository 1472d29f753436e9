"""The command line as users run it: the console scripts of the venv (``bin/selmerge-*`` beside
``sys.executable``), in a temporary directory outside the repository, on a tiny model fed from .npy token
files given as paths relative to that directory. Quick in-process checks of the same entry points
(``selmerge_jax.main.cli``) cover what needs no training: --print-config, the occupied-directory refusal, the
one-line errors."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from xla_flags import FAST_CPU_COMPILE

from selmerge_jax.config_io import ConfigError, from_dict
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.main import cli
from selmerge_jax.main.config import FinetuneConfig, PretrainConfig, load_experiment
from selmerge_jax.training.metrics import read_jsonl
from selmerge_jax.validation import UserError

ROOT = pathlib.Path(__file__).parents[1]
BIN = pathlib.Path(sys.executable).parent
DATA = ["data.train_npy=train.npy", "data.validation_npy=validation.npy"]  # relative to the working directory
# batch 8: divides over the 8 host devices conftest forces in process (the batch is never floored)
TRAIN = ["train.seq_len=64", "train.batch_size=8", "train.log_every=1", "train.eval_batches=1",
         "train.progress=false", "checkpoint.async_save=false", *DATA]
TINY = ["model.d_model=32", "model.ffn_dim=64", "model.num_layers=1", *TRAIN]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _run(script: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    path = BIN / script
    if not path.exists():
        pytest.fail(f"{path} is missing: the console scripts come with the install (pip install -e .)")
    # one CPU device, as a user's laptop (the tests' compile flags only)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_CPU_COMPILE}
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env,
                          check=False)


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


def _one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The last stderr line, which must be the whole error: no traceback before it."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), proc.stderr[-2000:]
    return last


def _write_tokens(directory: pathlib.Path):
    text = (ROOT / "selmerge_jax" / "training" / "loop.py").read_text() * 3
    tokens = ByteTokenizer().encode(text, add_bos=True, add_eos=True).astype(np.uint16)
    np.save(directory / "train.npy", tokens)
    np.save(directory / "validation.npy", tokens[: 4 * 65 * 2])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """``selmerge-pretrain`` run from a directory outside the repository: 2 steps, a checkpoint each."""
    work = tmp_path_factory.mktemp("cli")
    assert ROOT not in work.parents
    _write_tokens(work)
    proc = _run("selmerge-pretrain", ["--config", "demo", *_sets(TINY + [
        "train.steps=2", "checkpoint.every_steps=1", "train.output_dir=pre"])], work)
    return work, proc


def _copy_run(work: pathlib.Path, name: str, corrupt_step: int | None = None) -> pathlib.Path:
    shutil.copytree(work / "pre", work / name)
    if corrupt_step is not None:  # truncate the array data of that step (as a crash mid-copy would)
        for path in (work / name / "checkpoints" / str(corrupt_step) / "state").glob("ocdbt.process_*/d/*"):
            path.write_bytes(path.read_bytes()[:10])
    return work / name


@pytest.fixture(autouse=True)
def _restore_logging():
    """In-process CLI calls give the package logger its own handler (on the captured stderr)."""
    absl = logging.getLogger("absl").level
    yield
    logging.getLogger("absl").setLevel(absl)
    logger = logging.getLogger("selmerge_jax")
    for handler in [h for h in logger.handlers if getattr(h, "_selmerge_cli", False)]:
        logger.removeHandler(handler)
    logger.propagate = True


# ---- the console scripts ----------------------------------------------------------------------------------

def test_pretrain_runs_from_any_directory_and_records_its_config(pretrained):
    work, proc = pretrained
    summary = _summary(proc)
    assert summary["steps"] == 2 and summary["attention"] == "ms" and summary["final_val_loss"] > 0
    assert sorted(os.listdir(work / "pre" / "checkpoints")) == ["1", "2"]
    assert (work / "pre" / "loss_curve.png").stat().st_size > 0
    # the resolved config, every default filled in, loads back as the config that ran
    stored = yaml.safe_load((work / "pre" / "config.yaml").read_text())
    assert stored["checkpoint"]["allow_changes"] == [] and stored["train"]["wandb"] is None
    cfg = from_dict(PretrainConfig, stored)
    assert (cfg.train.steps, cfg.model.d_model, cfg.data.train_npy) == (2, 32, "train.npy")
    # info lines print (absl leaves the root logger at WARNING), with the run's size and an ETA
    assert "INFO selmerge_jax.training.loop: training steps 0 -> 2: 8 x 64 tokens a step, 1,024 tokens" in (
        proc.stderr)
    assert "ETA" in proc.stderr


def test_resume_refuses_a_changed_config_then_allows_it_past_a_corrupted_step(pretrained, monkeypatch,
                                                                               capsys):
    work, _ = pretrained
    run = _copy_run(work, "corrupt", corrupt_step=2)
    args = ["--config", "demo", *_sets(TINY + ["train.steps=3", "checkpoint.every_steps=1",
                                                f"train.output_dir={run.name}"])]
    monkeypatch.chdir(work)
    assert cli.pretrain(args) == 1  # in process: refused before anything compiles
    refused = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.startswith("selmerge-pretrain: error: ")
    assert "changed: train.steps) [train.steps: 2 -> 3]" in refused
    assert "--allow-change train.steps" in refused

    proc = _run("selmerge-pretrain", [*args, "--allow-change", "steps"], work)
    summary = _summary(proc)
    assert summary["resumed_from"] == 1 and summary["steps"] == 3
    assert f"checkpoint step 2 in {run / 'checkpoints'} cannot be read" in proc.stderr
    assert "resuming from the previous good step 1" in proc.stderr
    assert "accepting the change of train.steps: 2 -> 3" in proc.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "3"]  # step 2 written again by this run
    assert os.listdir(run / "checkpoints.corrupt") == ["2"]  # the unreadable one, set aside


def test_eval_of_a_corrupted_checkpoint_names_step_and_directory(pretrained):
    work, _ = pretrained
    run = _copy_run(work, "corrupt_eval", corrupt_step=2)
    proc = _run("selmerge-eval", ["perplexity", *_sets(DATA + [
        f"init.path={run.name}/checkpoints", "lengths=[64]", "windows=1",
        "chunk_size=64", "output_dir=eval"])], work)
    last = _one_line_error(proc, "selmerge-eval perplexity")
    assert f"checkpoint step 2 in {run / 'checkpoints'} cannot be read" in last


def test_finetune_takes_model_shapes_from_its_checkpoint(pretrained, monkeypatch, capsys):
    work, _ = pretrained
    monkeypatch.chdir(work)
    # the packaged finetune config names no model: shapes, attention and RoPE come from init.path
    assert cli.finetune(["--config", "finetune", "--set", "init.path=pre/checkpoints", "--print-config"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["d_model"], model["num_layers"], model["attention"]) == (32, 1, "ms")
    # a model section without a preset changes only what it names
    changed = ["init.path=pre/checkpoints", "model.attention=dense"]
    assert cli.finetune(["--config", "finetune", *_sets(changed), "--print-config"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["d_model"], model["attention"]) == (32, "dense")


def test_help_is_whole_and_bench_names_its_benchmarks(capsys):
    with pytest.raises(SystemExit) as done:
        cli.finetune(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "a model section without a preset changes only the fields it names (e.g. --set " \
           "model.attention=dense)." in text
    assert "--allow-change" in text and "--print-config" in text and "packaged config" in text
    assert cli.bench(["no_such_bench"]) == 1
    last = capsys.readouterr().err.strip()
    assert last.startswith("selmerge-bench: error: NAME='no_such_bench': no such benchmark; allowed: "
                           "attention,")


# ---- the same entry points in process: what needs no training -------------------------------------------

def test_print_config_prints_every_default_and_exits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.pretrain(["--config", "demo", "--set", "train.steps=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["optimizer"]["b2"] == 0.95  # a default the YAML omits
    assert from_dict(PretrainConfig, printed) == load_experiment(PretrainConfig, "demo", ["train.steps=7"])
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_fresh_run_into_an_occupied_directory_refuses_and_overwrite_clears(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("{}\n")
    args = ["--config", "demo", "--set", "checkpoint.resume=false", "--set", "train.output_dir=out"]
    assert cli.pretrain(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'out'} is not empty and checkpoint.resume=false" in err
    assert "Write to a new directory (--set train.output_dir=...) or pass --overwrite" in err
    assert (tmp_path / "out" / "metrics.jsonl").exists()
    cfg = load_experiment(PretrainConfig, "demo", ["checkpoint.resume=false", "train.output_dir=out"])
    with pytest.raises(UserError, match="is not empty"):  # another process of a job refuses it the same way
        cli.claim_output_dir(cfg, overwrite=False, delete=False)
    cli.claim_output_dir(cfg, overwrite=True, delete=False)  # ... and leaves the deleting to the primary
    assert (tmp_path / "out" / "metrics.jsonl").exists()
    cli.claim_output_dir(cfg, overwrite=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "keep").mkdir()
    with pytest.raises(UserError, match=r"--overwrite would delete .* holds the working directory"):
        cli.claim_output_dir(load_experiment(PretrainConfig, "demo", [f"train.output_dir={tmp_path}"]), True)
    assert (tmp_path / "keep").exists()


def test_user_mistakes_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def raises(error):
        def body():
            raise error
        return body

    assert cli.run_cli("p", raises(UserError("x=1: must be 2"))) == 1
    assert cli.run_cli("p", raises(ConfigError("train.stpes: unknown key"))) == 2
    assert capsys.readouterr().err.splitlines() == ["p: error: x=1: must be 2",
                                                    "p: config error: train.stpes: unknown key"]
    with pytest.raises(ZeroDivisionError):
        cli.run_cli("p", raises(ZeroDivisionError("a bug")))

    assert cli.pretrain(["--set", "train.stpes=3"]) == 2
    assert "config error: train.stpes: unknown key for TrainConfig" in capsys.readouterr().err
    assert cli.pretrain(["--config", "demo", *_sets(["data.train_npy=missing.npy",
                                                      "data.validation_npy=missing.npy"])]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"data.train_npy='missing.npy': no such file (relative to {tmp_path})")
    assert cli.finetune(["--set", "init.path=nope/checkpoints", "--print-config"]) == 1
    assert "error: init.path='nope/checkpoints': no such directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_an_eval_of_an_untrained_model_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scratch = ["init.kind=scratch", "model.preset=tiny", "data.train_npy=t.npy", "data.validation_npy=v.npy"]
    assert cli.evaluate(["perplexity", *_sets(scratch)]) == 1
    err = capsys.readouterr().err
    assert "WARNING: init.kind=scratch: this evaluates an UNTRAINED, randomly initialised model" in err
    assert err.strip().endswith(f"data.validation_npy='v.npy': no such file (relative to {tmp_path})")


def test_finetune_without_model_section_needs_a_checkpoint():
    with pytest.raises(ConfigError, match=r"model is required with init.kind='scratch'"):
        load_experiment(FinetuneConfig, "finetune", ["init.kind=scratch"])


@pytest.mark.slow
def test_pretrain_finetune_infer_chain(pretrained):
    work, pre = pretrained
    # the packaged finetune config names no model: shapes, attention and RoPE come from init.path
    fine = _summary(_run("selmerge-finetune", ["--config", "finetune", *_sets(TRAIN + [
        "init.path=pre/checkpoints", "train.steps=2", "train.seq_len=128", "train.output_dir=chain",
        "crd.cycle=256", "crd.original_max_position_embeddings=64", "crd.stage_steps=1",
        "data.passkey_ratio=0.0"])], work))  # a passkey prompt needs >= 254 byte tokens, more than T = 128
    assert fine["steps"] == 2 and fine["params"] > _summary(pre)["params"]  # LoRA adapters added
    scales = [r["crd_scale"] for r in read_jsonl(work / "chain" / "metrics.jsonl", key="loss").values()]
    assert scales == [2.0, 4.0]  # initial_scale 2, doubling every stage of one step
    inf = _summary(_run("selmerge-infer", ["--config", "infer", *_sets(DATA + [
        "init.path=chain/checkpoints", "prompt_tokens=96", "max_new_tokens=4", "chunk_size=32",
        "passkey.lengths=[256]", "passkey.depths=[0.5]", "output=inf/results.jsonl"])], work))
    assert inf["prompt_tokens"] == 96 and inf["decode_tokens_per_s"] > 0 and len(inf["passkey"]) == 1
    assert json.loads((work / "inf" / "results.jsonl").read_text())["new_tokens"] == 4
    assert (work / "inf" / "config.yaml").exists()


def test_asyncio_reports_of_aborted_checkpoint_reads_are_dropped_and_others_kept():
    """A read future garbage-collected after an unreadable checkpoint's one-line error stays silent (it came
    after the error line in a CI run); any other never-retrieved exception is still reported."""
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    aborted = ("Future exception was never retrieved\n"
               "future: <Future finished exception=ValueError('OUT_OF_RANGE: ")
    assert not cli._ABORTED_READ_LOGS.filter(record(aborted + "Error reading in OCDBT database')>"))
    assert cli._ABORTED_READ_LOGS.filter(record("Future exception was never retrieved\nfuture: KeyError()"))
    assert cli._ABORTED_READ_LOGS.filter(record("Executing <Task> took 0.2 seconds"))
    # the gather over a step's reads reports under its own class name; known by its orbax frame
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    with pytest.raises(RuntimeError) as raised:
        exec(compile("raise RuntimeError('Encountered error while reading array index')", orbax_file, "exec"))
    gathered = record("_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished "
                      "exception=RuntimeError('Encountered error while reading array index')>")
    gathered.exc_info = (RuntimeError, raised.value, raised.value.__traceback__)
    assert not cli._ABORTED_READ_LOGS.filter(gathered)
    assert cli._ABORTED_READ_LOGS.filter(record("_GatheringFuture exception was never retrieved\nKeyError()"))
