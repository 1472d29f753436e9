"""Checkpoints: pytree <-> nested dict, keep-last-K, exact resume after kill -9, crash while writing."""

import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.training import Checkpointer, TrainState, read_jsonl
from selmerge_jax.training.checkpoint import nested_to_tree, tree_to_nested

# A self-contained training run; the test drives it as a subprocess so that it can really be killed.
_TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from flax import nnx
    from selmerge_jax.data import TokenWindows
    from selmerge_jax.training import CheckpointConfig, OptimizerConfig, TrainConfig, train

    class Tiny(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.emb, self.out = nnx.Embed(16, 8, rngs=rngs), nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, x, positions=None, segment_ids=None):
            return self.out(jax.nn.gelu(self.emb(x)))

    def run(out_dir, delay):
        def slow(batch, step):  # gives the test time to kill the process between checkpoints
            time.sleep(delay)
            return batch
        tokens = np.random.default_rng(1).integers(0, 16, 4000)
        cfg = TrainConfig(steps=9, batch_size=4, seq_len=8, log_every=1, output_dir=out_dir, progress=False)
        result = train(Tiny(), TokenWindows(tokens, batch_size=4, seq_len=8, bos_id=16, seed=3), train=cfg,
                       optimizer=OptimizerConfig(learning_rate=3e-2, warmup_steps=2),
                       checkpoint=CheckpointConfig(every_steps=3, keep=2), batch_transform=slow)
        print("RESUMED_FROM", result.resumed_from, flush=True)

    if __name__ == "__main__":
        run(sys.argv[1], float(sys.argv[2]))
""")

_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from selmerge_jax.training import Checkpointer

    ckpt = Checkpointer(sys.argv[1], keep=5, async_save=False)
    ckpt.save(1, {"w": jnp.full((64,), 1.0)}, data_state={"next_batch": 1})
    ckpt.wait()

    async def die(self, *args, **kwargs):  # every byte of step 2 is on disk; the commit never happens
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, {"w": jnp.full((64,), 2.0)}, data_state={"next_batch": 2})
    ckpt.wait()
    print("NOT KILLED")
""")


def _script(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_tree_to_nested_roundtrip():
    state = TrainState(step=jnp.array(3), params={"a": {"k": jnp.ones((2, 2))}}, rest={},
                       opt_state=(jnp.zeros(2), {"mu": jnp.ones(1)}), rng=jnp.array([0, 1], jnp.uint32))
    nested = tree_to_nested(state)
    assert set(nested) == {"step", "params", "opt_state", "rng"}
    back = nested_to_tree(nested, state)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, state))
    with pytest.raises(KeyError, match="opt_state/1/mu"):
        nested_to_tree({**nested, "opt_state": {"0": jnp.zeros(2), "1": {}}}, state)


def test_keeps_last_k_and_restores_data_state(tmp_path):
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": jnp.full((4,), float(step))},
                      data_state={"next_batch": step, "raw": b"\x00\x01"},
                      meta={"config": {"lr": 0.1}})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        state, data, meta = ckpt.restore({"w": jnp.zeros((4,))})
        np.testing.assert_array_equal(state["w"], np.full((4,), 3.0))
        assert data == {"next_batch": 3, "raw": b"\x00\x01"} and meta == {"config": {"lr": 0.1}}
        assert ckpt.read_meta(2) == {"config": {"lr": 0.1}}
    with pytest.raises(FileNotFoundError, match="no finalized checkpoint"):
        Checkpointer(tmp_path / "empty").restore({"w": jnp.zeros((4,))})


def test_crash_while_writing_leaves_previous_checkpoint(tmp_path):
    pytest.importorskip("orbax.checkpoint._src.path.atomicity").AtomicRenameTemporaryPath  # noqa: B018
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, _script(tmp_path, _CRASH_SCRIPT, "crash.py"), str(ckpt_dir)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    leftovers = [d for d in os.listdir(ckpt_dir) if d != "1"]
    assert leftovers and all("tmp" in d for d in leftovers)  # step 2 was fully written, never committed
    ckpt = Checkpointer(ckpt_dir)
    assert ckpt.all_steps() == [1]
    state, data, _ = ckpt.restore({"w": jnp.zeros((64,))})
    np.testing.assert_array_equal(state["w"], np.ones(64))
    assert data == {"next_batch": 1}


def _wait_for_checkpoint(proc, ckpt_dir, step, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        if os.path.isdir(os.path.join(ckpt_dir, str(step))):  # only finalized steps carry the bare name
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} within {timeout} s")


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    script = _script(tmp_path, _TRAIN_SCRIPT, "train_run.py")
    full, killed = tmp_path / "full", tmp_path / "killed"
    runpy.run_path(script)["run"](str(full), 0.0)  # the uninterrupted reference, in this process

    proc = subprocess.Popen([sys.executable, script, str(killed), "0.4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, killed / "checkpoints", 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close(), proc.stderr.close()
    logged = read_jsonl(killed / "metrics.jsonl", key="loss")
    assert 3 <= max(logged) < 9  # killed after checkpoint 3, before the end

    resumed = subprocess.run([sys.executable, script, str(killed), "0"], capture_output=True, text=True,
                             timeout=300)
    start = int(resumed.stdout.split("RESUMED_FROM")[1].split()[0])
    assert start in (3, 6), resumed.stdout + resumed.stderr
    a, b = read_jsonl(full / "metrics.jsonl", key="loss"), read_jsonl(killed / "metrics.jsonl", key="loss")
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for step in range(start + 1, 10):  # bit-for-bit equal losses from the resume point on
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
        assert a[step]["grad_norm"] == b[step]["grad_norm"]


def test_resume_through_the_grain_pipeline_is_exact(tmp_path):
    """The same guarantee with the TFDS/grain path's iterator (its state is what goes into the checkpoint)."""
    from flax import nnx

    from selmerge_jax.data import PipelineConfig, lm_iterator
    from selmerge_jax.data.tokenizer import ByteTokenizer
    from selmerge_jax.training import CheckpointConfig, OptimizerConfig, TrainConfig, train

    class Bytes(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.emb, self.out = nnx.Embed(259, 8, rngs=rngs), nnx.Linear(8, 259, rngs=rngs)

        def __call__(self, x, positions=None, segment_ids=None):
            return self.out(jax.nn.gelu(self.emb(x)))

    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (i % 5 + 1) for i in range(40)]
    tok = ByteTokenizer()

    class Crash(Exception):
        pass

    class CrashAfter:
        """Passes batches through, then dies like a killed process would (after ``n`` batches)."""

        def __init__(self, it, n):
            self.it, self.n = it, n

        def __next__(self):
            if self.n == 0:
                raise Crash
            self.n -= 1
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    def run(out, crash_after=None):
        it = lm_iterator(docs, tok, PipelineConfig(seq_len=16, batch_size=4, seed=5, shuffle_window=8,
                                                   shard_index=0, shard_count=1))
        it = it if crash_after is None else CrashAfter(it, crash_after)
        cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, log_every=1, output_dir=str(out), progress=False)
        return train(Bytes(), it, train=cfg, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
                     checkpoint=CheckpointConfig(every_steps=3, async_save=False))

    full = run(tmp_path / "full")
    with pytest.raises(Crash):
        run(tmp_path / "cut", crash_after=4)  # dies fetching batch 5, after checkpoint 3
    resumed = run(tmp_path / "cut")
    assert resumed.resumed_from == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    """A run directory holding another experiment must not be continued (or, finished, reported) silently."""
    from flax import nnx

    from selmerge_jax.data import TokenWindows
    from selmerge_jax.training import CheckpointConfig, OptimizerConfig, TrainConfig, train

    class Tiny(nnx.Module):
        def __init__(self):
            self.emb = nnx.Embed(16, 16, rngs=nnx.Rngs(0))

        def __call__(self, x, positions=None, segment_ids=None):
            return self.emb(x)

    tokens = np.random.default_rng(1).integers(0, 16, 2000)

    def run(steps, config, allow=()):
        cfg = TrainConfig(steps=steps, batch_size=4, seq_len=8, log_every=1, output_dir=str(tmp_path),
                          progress=False)
        return train(Tiny(), TokenWindows(tokens, batch_size=4, seq_len=8, bos_id=16, seed=3), train=cfg,
                     optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
                     checkpoint=CheckpointConfig(every_steps=2, async_save=False, allow_changes=allow),
                     meta={"config": config})

    config = {"optimizer": {"learning_rate": 1e-2}, "train": {"steps": 2}, "data": {"copy_period": (8, 64)}}
    run(2, config)
    # extending a run is a resume once allowed (it changes the schedule); tuples stored as lists match
    longer = {**config, "train": {"steps": 4}}
    assert run(4, longer, allow=("train.steps",)).resumed_from == 2
    with pytest.raises(ValueError, match=r"another config \(changed: optimizer.learning_rate\)"):
        run(4, {**longer, "optimizer": {"learning_rate": 3e-2}})


def test_config_changes_ignore_what_a_resume_may_change():
    from selmerge_jax.training.checkpoint import config_changes

    stored = {"model": {"d": 8, "ms": {"top_k": 4}}, "train": {"steps": 10, "seed": 0},
              "init": {"path": "/a"},
              "crd": None}
    assert config_changes(stored, {**stored, "init": {"path": "/b"}}) == []
    # the length sets the learning-rate schedule: a change unless allowed
    assert config_changes(stored, {**stored, "train": {"steps": 20, "seed": 0}}) == ["train.steps"]
    changed = {**stored, "model": {"d": 8, "ms": {"top_k": 8}}, "train": {"steps": 10, "seed": 1},
               "crd": {"cycle": 4}}
    # crd: None -> a section
    assert config_changes(stored, changed) == ["crd", "model.ms.top_k", "train.seed"]
    # A checkpoint from before a field existed (its default applies) still resumes: data.validation_seed is
    # newer.
    assert config_changes(stored, {**stored, "data": {"validation_seed": 0}}) == []
    assert config_changes({"data": {"copy_period": [8, 64]}}, {"data": {"copy_period": (8, 64)}}) == []
