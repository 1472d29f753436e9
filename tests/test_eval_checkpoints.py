"""Every evaluation study loads every checkpoint the training scripts write: pretrain, fine-tune in full and
with LoRA, with and without CRD NTK (a LoRA checkpoint's adapters are part of the weights an eval
evaluates)."""

import pathlib

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from selmerge_jax.config_io import from_dict
from selmerge_jax.data.config import DataConfig
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.evaluation import fidelity, passkey, perplexity
from selmerge_jax.evaluation.common import ModelSource, load_model
from selmerge_jax.main import finetune, pretrain
from selmerge_jax.main.config import FinetuneConfig, PretrainConfig, load_experiment
from selmerge_jax.models.lora import LoRAConfig
from selmerge_jax.models.lora import trainable_filter as lora_filter
from selmerge_jax.training.checkpoint import Checkpointer, InitConfig, restore_model
from selmerge_jax.training.train_step import TrainState

ROOT = pathlib.Path(__file__).parents[1]
SHAPES = ["model.preset=tiny", "model.d_model=32", "model.ffn_dim=64", "model.num_layers=1",
          "model.num_heads=4", "model.num_kv_heads=2", "model.attention=dense"]
RUN = ["train.steps=1", "train.batch_size=8", "train.seq_len=64", "train.log_every=1", "train.eval_batches=1",
       "train.progress=false", "optimizer.warmup_steps=0", "checkpoint.async_save=false",
       "data.passkey_ratio=0.0"]
LORA = ["lora.rank=2", "lora.alpha=4.0", "train.trainable=lora"]
CRD = ["crd.cycle=256", "crd.original_max_position_embeddings=32", "crd.stage_steps=1"]
FINETUNES = {"full": [], "full_crd": CRD, "lora": LORA, "lora_crd": LORA + CRD}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{kind: checkpoint dir}`` of a pretrain run and of fine-tunes from it (one step each)."""
    root = tmp_path_factory.mktemp("runs")
    tokens = ByteTokenizer().encode((ROOT / "selmerge_jax" / "training" / "loop.py").read_text(),
                                    add_bos=True, add_eos=True).astype(np.uint16)
    np.save(root / "train.npy", tokens)
    data = [f"data.train_npy={root / 'train.npy'}", f"data.validation_npy={root / 'train.npy'}"]
    pre = load_experiment(PretrainConfig, None, SHAPES + RUN + data + [f"train.output_dir={root / 'pre'}"])
    pretrain.run_pretrain(pre)
    out = {"pretrain": root / "pre" / "checkpoints"}
    for name, extra in FINETUNES.items():
        cfg = load_experiment(FinetuneConfig, None, SHAPES + RUN + data + extra + [
            "init.kind=checkpoint", f"init.path={out['pretrain']}", f"train.output_dir={root / name}"])
        finetune.run_finetune(cfg)
        out[name] = root / name / "checkpoints"
    return {k: str(v) for k, v in out.items()}


def _logits(model, tokens):
    return np.asarray(model(tokens))


@pytest.mark.parametrize("kind", ["pretrain", *FINETUNES])
def test_load_model_takes_every_training_checkpoint(checkpoints, kind):
    trained, stored = restore_model(checkpoints[kind])
    assert bool(stored.get("lora")) == kind.startswith("lora")
    init = InitConfig(kind="checkpoint", path=checkpoints[kind])
    tokens = jnp.arange(1, 17, dtype=jnp.int32)[None]
    plain = load_model(ModelSource(init=init, rope=trained.config.rope))  # the weights as trained
    np.testing.assert_allclose(_logits(plain, tokens), _logits(trained, tokens), rtol=1e-5, atol=1e-5)
    # A changed attention kind and the CRD run's own inference rule keep the weights (adapters included).
    changed = load_model(ModelSource(init=init, model=trained.config.replace(attention="ms")))
    assert changed.config.attention == "ms"
    if "crd" in kind:
        assert load_model(ModelSource(init=init)).config.rope.rope_type == "ntk"


@pytest.mark.parametrize("kind", ["lora_crd", "full_crd"])
def test_eval_studies_run_on_finetune_checkpoints(checkpoints, kind, tmp_path):
    init = InitConfig(kind="checkpoint", path=checkpoints[kind])
    npy = str(pathlib.Path(checkpoints["pretrain"]).parents[1] / "train.npy")
    data = DataConfig(train_npy=npy, validation_npy=npy)
    passkey.run_passkey(passkey.PasskeyEvalConfig(init=init, model=None, lengths=(288,), depths=(0.5,),
                                                  per_cell=1, chunk_size=96, output_dir=str(tmp_path / "pk")))
    perplexity.run_perplexity(perplexity.PerplexityEvalConfig(init=init, model=None, data=data, lengths=(32,),
                                                              windows=1, chunk_size=32,
                                                              output_dir=str(tmp_path / "ppl")))
    fidelity.run_fidelity(fidelity.FidelityEvalConfig(init=init, model=None, data=data, prompt_tokens=32,
                                                      num_prompts=1, max_new_tokens=2, chunk_size=32,
                                                      output_dir=str(tmp_path / "fid")))


def test_restore_model_reads_weights_not_optimizer_state(checkpoints, tmp_path, monkeypatch):
    """A step whose optimizer state is unreadable (here: an entry of a shape no optimizer makes) still
    restores for inference, and the one read asks for ``params`` and ``rest`` only."""
    source = checkpoints["lora"]
    model, stored = restore_model(source)
    with Checkpointer(source) as ck:
        meta, step = ck.read_meta(), ck.latest_step()
    _, params, rest = nnx.split(model, lora_filter(from_dict(LoRAConfig, stored["lora"], "lora")), ...)
    junk = TrainState(step=jnp.int32(step + 1), params=params, rest=rest,
                      opt_state={"junk": jnp.zeros((3, 5))}, rng=jnp.zeros((2,), jnp.uint32))
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(step + 1, junk, meta=meta)
    items = []
    real = ocp.CheckpointManager.restore
    monkeypatch.setattr(ocp.CheckpointManager, "restore",
                        lambda self, s, args=None: items.append(args) or real(self, s, args=args))
    again, _ = restore_model(str(tmp_path))
    tokens = jnp.arange(1, 17, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(_logits(again, tokens), _logits(model, tokens))
    state_reads = [a["state"] for a in items if "state" in a]
    assert state_reads and all(set(a.item) == {"params", "rest"} for a in state_reads)
