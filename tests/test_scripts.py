"""The experiment scripts end to end, as users run them: pretrain -> finetune (LoRA + CRD) -> infer, on a tiny
model fed from .npy token files (no TFDS build, so the test stays quick); bad config keys exit with code 2."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from selmerge_jax.data.tokenizer import ByteTokenizer

ROOT = pathlib.Path(__file__).parents[1]
TINY = ["model.d_model=32", "model.ffn_dim=64", "model.num_layers=1", "train.seq_len=64",
        "train.batch_size=2",
        "train.log_every=1", "train.eval_batches=1", "train.progress=false", "checkpoint.async_save=false"]


def _run(script: str, config: str, overrides: list[str], cwd) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "experiments" / script), "--config",
            str(ROOT / "experiments/configs" / config)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device, as a user's laptop
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, env=env,
                          check=False)


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


@pytest.fixture
def npy_data(tmp_path):
    text = (ROOT / "selmerge_jax" / "training" / "loop.py").read_text() * 3
    tokens = ByteTokenizer().encode(text, add_bos=True, add_eos=True).astype(np.uint16)
    np.save(tmp_path / "train.npy", tokens)
    np.save(tmp_path / "validation.npy", tokens[: 4 * 65 * 2])
    return [f"data.train_npy={tmp_path / 'train.npy'}", f"data.validation_npy={tmp_path / 'validation.npy'}"]


def _pretrain(tmp_path, npy_data) -> tuple[dict, pathlib.Path]:
    pre = _summary(_run("pretrain.py", "demo.yaml", TINY + npy_data + [
        "train.steps=3", f"train.output_dir={tmp_path / 'pre'}"], tmp_path))
    assert pre["steps"] == 3 and pre["attention"] == "ms" and pre["final_val_loss"] > 0
    assert (tmp_path / "pre" / "loss_curve.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path / "pre" / "checkpoints")) == ["3"]
    return pre, tmp_path / "pre" / "checkpoints"


def test_pretrain_script(tmp_path, npy_data):
    _pretrain(tmp_path, npy_data)


@pytest.mark.slow
def test_pretrain_finetune_infer_chain(tmp_path, npy_data):
    pre, ckpt = _pretrain(tmp_path, npy_data)
    model = ["model.preset=tiny", "model.d_model=32", "model.ffn_dim=64", "model.num_layers=1",
             "model.num_heads=4",
             "model.num_kv_heads=2", "model.ms.block_size=16", "model.ms.top_k=4"]  # the checkpoint's shapes
    fine = _summary(_run("finetune.py", "finetune.yaml", TINY + npy_data + model + [
        f"init.path={ckpt}", "train.steps=2", "train.seq_len=128", f"train.output_dir={tmp_path / 'fine'}",
        "crd.cycle=256", "crd.original_max_position_embeddings=64", "crd.stage_steps=1",
        "data.passkey_ratio=0.0"], tmp_path))  # a passkey prompt needs >= 254 byte tokens, more than T = 128
    assert fine["steps"] == 2 and fine["params"] > pre["params"]  # LoRA adapters added

    inf = _summary(_run("infer.py", "infer.yaml", npy_data + [
        f"init.path={tmp_path / 'fine' / 'checkpoints'}", "prompt_tokens=96", "max_new_tokens=4",
        "chunk_size=32", "passkey.lengths=[256]", "passkey.depths=[0.5]", f"output={tmp_path / 'inf.jsonl'}"],
        tmp_path))
    assert inf["prompt_tokens"] == 96 and inf["decode_tokens_per_s"] > 0 and len(inf["passkey"]) == 1
    assert json.loads((tmp_path / "inf.jsonl").read_text())["new_tokens"] == 4


def test_bad_override_exits_with_key_path(tmp_path):
    proc = _run("pretrain.py", "pretrain.yaml", ["train.stpes=3"], tmp_path)
    assert proc.returncode == 2
    assert "config error: train.stpes: unknown key for TrainConfig" in proc.stderr
