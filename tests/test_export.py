"""``selmerge-export``: a LoRA + CRD NTK fine-tune's checkpoint becomes a Hugging Face directory that reloads
here and in ``transformers`` with the checkpoint's logits (float32, <= 1e-4), with the CRD fixed-base rule in
its config; what has no Hugging Face form is refused before anything is written."""

import json
import pathlib
import tomllib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.evaluation.common import ModelSource, load_model
from selmerge_jax.main import export, finetune, pretrain
from selmerge_jax.main.config import FinetuneConfig, PretrainConfig, load_experiment
from selmerge_jax.models import Llama, load_hf, preset, save_hf
from selmerge_jax.models.lora import LoRAConfig, apply_lora
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig

ROOT = pathlib.Path(__file__).parents[1]
SHAPES = ["model.preset=tiny", "model.d_model=32", "model.ffn_dim=64", "model.num_layers=1",
          "model.num_heads=4", "model.num_kv_heads=2", "model.attention=dense"]
RUN = ["train.steps=1", "train.batch_size=8", "train.seq_len=64", "train.log_every=1", "train.eval_batches=1",
       "train.progress=false", "optimizer.warmup_steps=0", "checkpoint.async_save=false",
       "data.passkey_ratio=0.0"]
# A large learning rate: one Adam step moves every LoRA B entry by ~lr, so merging changes the logits a lot.
LORA_CRD = ["lora.rank=2", "lora.alpha=4.0", "train.trainable=lora", "optimizer.learning_rate=0.05",
            "crd.cycle=256", "crd.original_max_position_embeddings=32", "crd.stage_steps=1",
            "crd.inference_scale=8.0"]


@pytest.fixture(scope="module")
def lora_crd_checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("runs")
    tokens = ByteTokenizer().encode((ROOT / "selmerge_jax" / "training" / "loop.py").read_text(),
                                    add_bos=True, add_eos=True).astype(np.uint16)
    np.save(root / "train.npy", tokens)
    data = [f"data.train_npy={root / 'train.npy'}", f"data.validation_npy={root / 'train.npy'}"]
    pretrain.run_pretrain(load_experiment(PretrainConfig, None, SHAPES + RUN + data + [
        f"train.output_dir={root / 'pre'}"]))
    finetune.run_finetune(load_experiment(FinetuneConfig, None, SHAPES + RUN + data + LORA_CRD + [
        "init.kind=checkpoint", f"init.path={root / 'pre' / 'checkpoints'}",
        f"train.output_dir={root / 'ft'}"]))
    return str(root / "ft" / "checkpoints")


def _evaluated_logits(checkpoint: str, tokens: np.ndarray) -> np.ndarray:
    """What the eval scripts compute: LoRA unmerged, the CRD run's fixed-base inference rule."""
    model = load_model(ModelSource(init=InitConfig(kind="checkpoint", path=checkpoint)))
    assert model.config.rope.rope_type == "ntk" and model.config.rope.factor == 8.0
    return np.asarray(model(jnp.asarray(tokens)))


@pytest.mark.hf
def test_export_reloads_here_and_in_transformers_with_the_same_logits(lora_crd_checkpoint, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert export.main([lora_crd_checkpoint, str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.split("SUMMARY ", 1)[1])
    assert summary["max_abs_logit_diff"] <= 1e-4 and summary["rope_type"] == "ntk"
    hf_config = json.loads((out / "config.json").read_text())
    # the CRD inference rule theta * A^(d/(d-2)) with A = 8, d = 8, as transformers reads it
    assert hf_config["rope_theta"] == pytest.approx(10000.0 * 8.0 ** (8 / 6))
    assert not hf_config["rope_scaling"]

    tokens = np.random.default_rng(1).integers(0, 259, (2, 48)).astype(np.int32)
    ref = _evaluated_logits(lora_crd_checkpoint, tokens)
    here = np.asarray(load_hf(str(out))(jnp.asarray(tokens)))
    assert np.abs(here - ref).max() <= 1e-4
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - ref).max() <= 1e-4
    # the adapters and the CRD rule both matter at this size: dropping either would fail the checks above
    plain = load_model(ModelSource(init=InitConfig(kind="checkpoint", path=lora_crd_checkpoint),
                                   rope=RopeConfig()))
    assert np.abs(np.asarray(plain(jnp.asarray(tokens))) - ref).max() > 1e-2


def _tiny(**changes) -> Llama:
    return Llama(preset("tiny", d_model=32, ffn_dim=64, num_layers=1, **changes), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("changes, message", [
    ({"rope": RopeConfig(logn_length=64)}, r"logn_length=64: log-n query scaling has no Hugging Face form"),
    ({"rope": RopeConfig(layout="interleaved")}, r"layout='interleaved': has no Hugging Face Llama form"),
    ({"attention": "ms", "ms": MSAttentionConfig(block_size=16, top_k=4, selection_source="previous",
                                                 position_mode="selected_compact")},
     r"position_mode='selected_compact': has no Hugging Face form"),
])
def test_save_hf_refuses_what_has_no_hf_form_before_writing(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        save_hf(_tiny(**changes), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_ms_model_with_true_positions_exports(tmp_path):
    """Select-and-merge weights are a Llama's: exported (transformers runs them densely), logits checked."""
    model = _tiny(attention="ms")
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    save_hf(export.merge_lora(model), str(tmp_path))
    tokens = export.check_tokens_for(model, 32)
    np.testing.assert_allclose(export.logits_for_check(load_hf(str(tmp_path)), tokens),
                               export.logits_for_check(model, tokens), atol=1e-5)


def test_export_cli_errors_are_one_line(lora_crd_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "nowhere"), str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "ExportConfig.checkpoint=" in err and "nowhere" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(SystemExit):
        export.main([lora_crd_checkpoint, str(tmp_path / "busy")])
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export.main([lora_crd_checkpoint, str(tmp_path / "x"), "--dtype", "int8"])  # argparse choices
    assert exit_info.value.code == 2 and "float32" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["selmerge-export"].split(":")
    assert module == "selmerge_jax.main.export" and func == "main"
