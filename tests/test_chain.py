"""The README's first-day chain at tiny size, through the entry points of ``selmerge_jax/main`` with the
README's configs: pretrain -> fine-tune (LoRA + CRD NTK) -> evaluate (passkey, perplexity) -> export ->
reload in ``transformers`` -> infer. Also the export acceptance: the exported directory reloads here and in
``transformers`` with the logits the eval scripts compute (float32, <= 1e-4), CRD fixed-base RoPE included."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.evaluation.common import ModelSource, load_model
from selmerge_jax.evaluation.passkey import PasskeyEvalConfig
from selmerge_jax.evaluation.perplexity import PerplexityEvalConfig
from selmerge_jax.main import evaluate, export, finetune, infer, pretrain
from selmerge_jax.main.config import FinetuneConfig, InferConfig, PretrainConfig, load_experiment
from selmerge_jax.models import load_hf
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig

ROOT = pathlib.Path(__file__).parents[1]
CONFIGS = ROOT / "selmerge_jax" / "main" / "configs"
# demo.yaml's tiny model, smaller still; dense so that the few steps compile quickly
SHAPES = ["model.preset=tiny", "model.d_model=32", "model.ffn_dim=64", "model.num_layers=1",
          "model.num_heads=4", "model.num_kv_heads=2", "model.attention=dense"]
RUN = ["train.steps=1", "train.batch_size=8", "train.seq_len=64", "train.log_every=1", "train.eval_batches=1",
       "train.progress=false", "optimizer.warmup_steps=0", "checkpoint.async_save=false",
       "data.passkey_ratio=0.0"]
# One Adam step at a large rate moves every LoRA B entry by ~lr: merging the adapters changes the logits.
FINETUNE = ["lora.rank=2", "lora.alpha=4.0", "optimizer.learning_rate=0.05", "crd.cycle=256",
            "crd.original_max_position_embeddings=32", "crd.stage_steps=1", "crd.inference_scale=8.0"]
CHECKPOINT = ["init.kind=checkpoint", "model=null"]


@pytest.mark.hf
def test_first_day_chain(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens = ByteTokenizer().encode((ROOT / "selmerge_jax" / "training" / "loop.py").read_text(),
                                    add_bos=True, add_eos=True).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    data = [f"data.train_npy={tmp_path / 'tokens.npy'}", f"data.validation_npy={tmp_path / 'tokens.npy'}"]
    monkeypatch.setenv("SELMERGE_PROGRESS", "1")  # the eval loops' bars, shown as on a terminal

    pre = pretrain.main(load_experiment(PretrainConfig, str(CONFIGS / "demo.yaml"), SHAPES + RUN + data + [
        f"train.output_dir={tmp_path / 'pre'}"]))
    ft = finetune.main(load_experiment(FinetuneConfig, str(CONFIGS / "finetune.yaml"),
                                       SHAPES + RUN + data + FINETUNE + [
                                           f"init.path={tmp_path / 'pre' / 'checkpoints'}",
                                           f"train.output_dir={tmp_path / 'ft'}"]))
    assert pre["steps"] == ft["steps"] == 1 and ft["params"] > pre["params"]  # the adapters
    ckpt = str(tmp_path / "ft" / "checkpoints")

    grid = evaluate.main(load_experiment(PasskeyEvalConfig, str(CONFIGS / "eval_passkey.yaml"), CHECKPOINT + [
        f"init.path={ckpt}", "lengths=[288]", "depths=[0.5]", "per_cell=1", "chunk_size=96",
        f"output_dir={tmp_path / 'passkey'}"]))
    passkey = json.loads(pathlib.Path(grid["json"]).read_text())
    assert passkey["rope"]["rope_type"] == "ntk" and len(passkey["examples"]) == 1  # the CRD inference rule
    ppl = evaluate.main(load_experiment(PerplexityEvalConfig, str(CONFIGS / "eval_perplexity.yaml"), [
        *CHECKPOINT, *data, f"init.path={ckpt}", "lengths=[64]", "windows=1", "chunk_size=32",
        f"output_dir={tmp_path / 'ppl'}"]))
    assert np.isfinite(ppl["perplexity"]["chunked@64"]) and pathlib.Path(ppl["png"]).exists()

    hf = tmp_path / "hf"
    assert export.main([ckpt, str(hf)]) == 0
    printed = capsys.readouterr()
    assert "passkey: lengths" in printed.err and "perplexity (chunked)" in printed.err  # progress bars
    summary = json.loads(printed.out.rsplit("SUMMARY ", 1)[1])
    assert summary["max_abs_logit_diff"] <= 1e-4
    hf_config = json.loads((hf / "config.json").read_text())
    # the CRD inference rule theta * A^(d/(d-2)), A = 8, d = 8: the positions the eval scripts used
    assert hf_config["rope_theta"] == pytest.approx(10000.0 * 8.0 ** (8 / 6))
    ids = np.random.default_rng(1).integers(0, 259, (2, 48)).astype(np.int32)
    evaluated = load_model(ModelSource(init=InitConfig(kind="checkpoint", path=ckpt)))  # LoRA unmerged
    ref = np.asarray(evaluated(jnp.asarray(ids)))
    assert np.abs(np.asarray(load_hf(str(hf))(jnp.asarray(ids))) - ref).max() <= 1e-4
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - ref).max() <= 1e-4
    # the adapters and the CRD rule both matter at this size: an export without either fails the checks above
    plain = load_model(ModelSource(init=InitConfig(kind="checkpoint", path=ckpt), rope=RopeConfig()))
    assert np.abs(np.asarray(plain(jnp.asarray(ids))) - ref).max() > 1e-2

    run = infer.main(load_experiment(InferConfig, str(CONFIGS / "infer.yaml"), data + [
        f"init.path={ckpt}", "prompt_tokens=64", "max_new_tokens=4", "chunk_size=32", "passkey=null",
        f"output={tmp_path / 'infer.jsonl'}"]))
    assert run["prompt_tokens"] == 64 and run["decode_tokens_per_s"] > 0 and run["time_to_first_token_s"] > 0
