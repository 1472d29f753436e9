"""What a training run refuses and reports, in process and at toy size (the command-line side is in
tests/test_cli.py): the divergence guard, the resume allow-list, a fresh run into another run's checkpoints, a
missing init.path, the CRD scale and ETA lines, the progress bar's postfix, and W&B through a fake module."""

import io
import logging
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.data import TokenWindows
from selmerge_jax.positional.crd_ntk import CRDNTKConfig, crd_scale
from selmerge_jax.training import CheckpointConfig, Checkpointer, OptimizerConfig, TrainConfig, train
from selmerge_jax.training.checkpoint import allowed_change, config_differences, restore_model
from selmerge_jax.training.config import WandbConfig
from selmerge_jax.training.loop import DivergenceError
from selmerge_jax.training.metrics import MetricsWriter, Progress, read_jsonl
from selmerge_jax.validation import UserError

V = 16


class Tiny(nnx.Module):
    def __init__(self):
        self.emb = nnx.Embed(V, V, rngs=nnx.Rngs(0))

    def __call__(self, x, positions=None, segment_ids=None):
        return self.emb(x)


def _run(out, steps, *, forward=None, checkpoint=None, meta=None, step_log=None, log_every=1):
    tokens = np.random.default_rng(1).integers(0, V, 2000)
    kwargs = {} if forward is None else {"forward": forward}
    return train(Tiny(), TokenWindows(tokens, batch_size=2, seq_len=8, bos_id=V, seed=3),
                 train=TrainConfig(steps=steps, batch_size=2, seq_len=8, log_every=log_every,
                                   output_dir=str(out), progress=False),
                 optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
                 checkpoint=checkpoint or CheckpointConfig(every_steps=2, async_save=False), meta=meta,
                 step_log=step_log, **kwargs)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    def poisoned(model, inputs, ctx):  # finite through step 3, NaN from step 4 (ctx.step counts from 0)
        logits = model(inputs["tokens"])
        return logits * jnp.where(ctx.step >= 3, jnp.nan, 1.0)

    # log_every=4: the NaN sits inside a log interval, and the save at step 4 must still not happen
    with pytest.raises(DivergenceError, match=r"diverged at step 4: loss=nan.*last good checkpoint is step "
                                              r"2"):
        _run(tmp_path, 6, forward=poisoned, log_every=4)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_resume_accepts_only_allowed_changes_and_logs_each(tmp_path, caplog):
    config = {"optimizer": {"learning_rate": 1e-2}, "train": {"steps": 2}}
    _run(tmp_path, 2, meta={"config": config})
    longer = {**config, "train": {"steps": 4}}
    with pytest.raises(UserError, match=r"changed: train.steps\).*--allow-change train.steps"):
        _run(tmp_path, 4, meta={"config": longer})
    allow = CheckpointConfig(every_steps=2, async_save=False, allow_changes=("steps",))
    with caplog.at_level(logging.WARNING, logger="selmerge_jax.training.loop"):
        logging.getLogger("selmerge_jax").propagate = True  # an in-process CLI test may have cut it off
        assert _run(tmp_path, 4, meta={"config": longer}, checkpoint=allow).resumed_from == 2
    assert "accepting the change of train.steps: 2 -> 4" in caplog.text
    assert allowed_change("optimizer.learning_rate", ["learning_rate"])
    assert not allowed_change("optimizer.learning_rate", ["rate"])
    assert config_differences({"crd": None, "a": 1}, {"crd": {"cycle": 4}, "a": 1}) == {
        "crd": (None, {"cycle": 4})}


def test_a_fresh_run_refuses_another_runs_checkpoints(tmp_path):
    _run(tmp_path, 2)
    fresh = CheckpointConfig(every_steps=2, async_save=False, resume=False)
    with pytest.raises(UserError, match=r"resume=false but .* already holds checkpoints \(steps 2\)"):
        _run(tmp_path, 2, checkpoint=fresh)


def test_a_missing_init_path_is_rejected_not_created(tmp_path):
    missing = tmp_path / "no" / "checkpoints"
    with pytest.raises(UserError, match=r"init.path=.*no/checkpoints': no such directory"):
        restore_model(str(missing))
    assert not (tmp_path / "no").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no finalized checkpoint step"):
        restore_model(str(tmp_path / "empty"))


def test_step_log_adds_the_crd_scale_to_every_line(tmp_path, caplog):
    crd = CRDNTKConfig(cycle=64, original_max_position_embeddings=8, stage_steps=1)
    from selmerge_jax.main.finetune import crd_step_log

    with caplog.at_level(logging.INFO, logger="selmerge_jax.training.loop"):
        logging.getLogger("selmerge_jax").propagate = True
        _run(tmp_path, 3, step_log=crd_step_log(crd))
    lines = read_jsonl(tmp_path / "metrics.jsonl", key="loss")
    assert [r["crd_scale"] for r in lines.values()] == [float(crd_scale(crd, s)) for s in (0, 1, 2)]
    assert lines[1]["crd_scale"] < lines[3]["crd_scale"]  # the stages grew
    assert "ETA" in caplog.text and "tokens in all" in caplog.text


def test_the_progress_bar_shows_the_newest_loss_at_once():
    stream = io.StringIO()
    bar = Progress(0, 10, file=stream)
    bar.update(2, {"loss": 1.2345})
    assert "loss=1.234" in stream.getvalue()  # not one interval late
    bar.update(4, {"loss": 0.5678})
    assert "loss=0.5678" in stream.getvalue().split("\r")[-1]
    bar.close()


def test_wandb_logs_beside_the_jsonl_through_an_injected_module(tmp_path, monkeypatch):
    calls = {"log": []}

    class Run:
        id = "run-1"

        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = WandbConfig(project="p", name="n", mode="offline")
    with MetricsWriter(tmp_path, tensorboard=False, wandb=cfg, run_config={"train": {"steps": 3}}) as writer:
        writer.write(1, {"loss": 2.5, "tokens_per_s": 10.0})
    assert calls["init"]["project"] == "p" and calls["init"]["mode"] == "offline"
    assert calls["init"]["config"] == {"train": {"steps": 3}} and calls["init"]["dir"] == str(tmp_path)
    assert calls["log"] == [(1, {"loss": 2.5, "tokens_per_s": 10.0})] and calls["finished"]
    assert (tmp_path / "wandb_run_id").read_text() == "run-1"  # a resumed run continues the same W&B run
    with MetricsWriter(tmp_path, tensorboard=False, wandb=cfg):
        assert calls["init"]["id"] == "run-1"
    with MetricsWriter(tmp_path, tensorboard=False):  # off unless asked
        assert len([c for c in calls if c == "init"]) == 1

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: `import wandb` raises ImportError
    with pytest.raises(UserError, match="wandb package is not installed: pip install wandb"):
        MetricsWriter(tmp_path / "x", tensorboard=False, wandb=cfg)
    assert jax.process_index() == 0
