"""Each evaluation study end to end on CPU with a tiny model and a small grid: it writes its JSON and PNG and
the figures in them are sane. Data comes from a .npy token file (no TFDS build) to keep the file quick."""

import json
import pathlib
import sys

import numpy as np
import pytest
from experiment_scripts import load_script

from selmerge_jax.data.config import DataConfig
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.evaluation import fidelity, memory_report, passkey, perplexity
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.main import loss_curve_sweep
from selmerge_jax.main.config import FinetuneConfig
from selmerge_jax.models.config import preset
from selmerge_jax.positional import RopeConfig

ROOT = pathlib.Path(__file__).parents[1]
MICRO = preset("tiny", d_model=32, ffn_dim=64, num_layers=1, attention="dense")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def npy(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    text = (ROOT / "selmerge_jax" / "training" / "loop.py").read_text()
    tokens = ByteTokenizer().encode(text, add_bos=True, add_eos=True).astype(np.uint16)
    np.save(d / "train.npy", tokens)
    np.save(d / "validation.npy", tokens[::-1].copy())
    return str(d / "train.npy"), str(d / "validation.npy")


def _outputs(result: dict) -> dict:
    assert pathlib.Path(result["png"]).read_bytes()[:8] == PNG_MAGIC
    return json.loads(pathlib.Path(result["json"]).read_text())


def test_passkey_study_with_ntk_rule(tmp_path):
    cfg = passkey.PasskeyEvalConfig(model=MICRO, rope=RopeConfig(rope_type="ntk", factor=4.0), lengths=(288,),
                                    depths=(0.0, 1.0), per_cell=1, chunk_size=96, output_dir=str(tmp_path))
    data = _outputs(passkey.run_passkey(cfg))
    assert np.asarray(data["accuracy"]).shape == (2, 1) and data["rope"]["rope_type"] == "ntk"
    assert 0.0 <= data["mean_accuracy"] <= 1.0 and data["backend"] == "cpu"
    assert [e["length"] for e in data["examples"]] == [288, 288]


def test_perplexity_study(tmp_path, npy):
    cfg = perplexity.PerplexityEvalConfig(model=MICRO,
                                          data=DataConfig(train_npy=npy[0], validation_npy=npy[1]),
                                          lengths=(32, 64), windows=2, chunk_size=32,
                                          output_dir=str(tmp_path))
    data = _outputs(perplexity.run_perplexity(cfg))
    assert [r["length"] for r in data["rows"]] == [32, 64]
    for r in data["rows"]:  # an untrained byte model is close to uniform over its 259 ids
        assert 100 < r["perplexity"] < 600 and r["tokens"] == 2 * r["length"]


def test_fidelity_study_keeps_the_budget(tmp_path, npy):
    kv = KVCompressionConfig(policy="h2o", budget=24, slack=32, sink=2, window=8)
    cfg = fidelity.FidelityEvalConfig(model=MICRO, data=DataConfig(train_npy=npy[0], validation_npy=npy[1]),
                                      prompt_tokens=64, num_prompts=2, max_new_tokens=4, chunk_size=32,
                                      compressions=(kv,), output_dir=str(tmp_path))
    result = fidelity.run_fidelity(cfg)
    data = _outputs(result)
    (setting,) = data["settings"]
    assert setting["name"] == "h2o b=24" and len(setting["prompts"]) == 2
    assert setting["mean"]["kept_ratio"] == pytest.approx(24 / 64)
    for row in setting["prompts"]:
        assert 0 <= row["jaccard"] <= 1 and 0 <= row["rouge_l"] <= 1 and 0 <= row["exact_prefix"] <= 4
    assert "| h2o b=24 | 0.375 |" in result["table"]


def test_memory_study(tmp_path):
    cfg = memory_report.MemoryReportConfig(model=MICRO, lengths=(64,), new_tokens=2, chunk_size=32, repeats=1,
                                           output_dir=str(tmp_path))
    (row,) = _outputs(memory_report.run_memory_report(cfg))["rows"]
    assert row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["prefill_plan_bytes"] > 0 and row["forward_plan_bytes"] > 0


def test_loss_curve_sweep(tmp_path, npy):
    base = ["model.d_model=32", "model.ffn_dim=64", "model.num_layers=1", "model.ms.block_size=8",
            f"data.train_npy={npy[0]}", f"data.validation_npy={npy[1]}", "train.steps=2",
            "train.batch_size=8",
            "train.seq_len=32", "train.log_every=1", "train.eval_batches=1", "train.progress=false",
            "optimizer.warmup_steps=1", "checkpoint.every_steps=0", "checkpoint.async_save=false"]
    sweep = loss_curve_sweep.LossCurveSweepConfig(base_overrides=tuple(base), output_dir=str(tmp_path),
                                                  variants={"dense": ["model.attention=dense"],
                                                            "ms_k2": ["model.ms.top_k=2"]})
    result = loss_curve_sweep.run_loss_curves(sweep)
    runs = _outputs(result)["runs"]
    assert set(runs) == {"dense", "ms_k2"}
    assert runs["dense"]["attended_fraction"] == 1.0 > runs["ms_k2"]["attended_fraction"]
    assert runs["dense"]["train_flops_total"] > runs["ms_k2"]["train_flops_total"]
    for r in runs.values():
        assert r["curve"]["step"] == [1, 2] and r["tokens"] == 2 * 8 * 32 and np.isfinite(r["final_val_loss"])
        assert r["compiled_step_bytes"] > 0
    assert result["table"].splitlines()[2].startswith("| dense | dense | 1.000 |")


def test_loss_curve_sweep_from_a_warm_start_over_seeds(tmp_path, npy):
    base = ["model.d_model=32", "model.ffn_dim=64", "model.num_layers=1", "model.ms.block_size=8",
            f"data.train_npy={npy[0]}", f"data.validation_npy={npy[1]}", "train.steps=2",
            "train.batch_size=8",
            "train.seq_len=32", "train.log_every=1", "train.eval_batches=1", "train.eval_every=2",
            "train.progress=false", "optimizer.warmup_steps=1", "checkpoint.every_steps=0",
            "checkpoint.async_save=false"]
    sweep = loss_curve_sweep.LossCurveSweepConfig(
        base_overrides=tuple(base), output_dir=str(tmp_path), seeds=(3, 5),
        warm_start=("model.attention=dense", "train.steps=3"),
        variants={"dense": ["model.attention=dense"], "ms_k2": ["model.ms.top_k=2"]})
    result = loss_curve_sweep.run_loss_curves(sweep)
    data = _outputs(result)
    assert data["warm"]["tokens"] == 3 * 8 * 32 and data["seeds"] == [3, 5]
    for name, row in data["runs"].items():
        per_seed = row["per_seed"]
        assert set(per_seed) == {"3", "5"} and (tmp_path / name / "seed5" / "metrics.jsonl").exists()
        vals = [per_seed[k]["final_val_loss"] for k in ("3", "5")]
        assert row["final_val_loss"] == pytest.approx(np.mean(vals))
        assert row["final_val_loss_std"] == pytest.approx(np.std(vals, ddof=1))
        assert vals[0] != vals[1]  # the seeds are different runs...
        first = [per_seed[k]["curve"]["loss"][0] for k in ("3", "5")]
        assert row["curve"]["loss"][0] == pytest.approx(np.mean(first))
    # ...fine-tuned from warm's final checkpoint (restoring it is run_finetune's, tested with the
    # reproduction)
    cfg = loss_curve_sweep.variant_config(sweep, "ms_k2", 5)
    assert isinstance(cfg, FinetuneConfig) and cfg.train.seed == 5 and cfg.model.attention == "ms"
    assert cfg.init.kind == "checkpoint" and cfg.init.path == str(tmp_path / "warm" / "checkpoints")
    assert (tmp_path / "warm" / "checkpoints").is_dir()
    assert data["order"]["val"]["order"] == ["ms_k2", "dense"]
    assert " ± " in result["table"].splitlines()[2]
    # Re-running finds every run finished: nothing trains, and the figures are read back, not lost.
    again = _outputs(loss_curve_sweep.run_loss_curves(sweep))
    for name, row in data["runs"].items():
        assert again["runs"][name]["final_val_loss"] == pytest.approx(row["final_val_loss"])
        assert again["runs"][name]["per_seed"] == row["per_seed"]
    assert again["order"] == data["order"]


def test_validation_windows_do_not_depend_on_the_training_seed(npy):
    from selmerge_jax.main.config import PretrainConfig, load_experiment
    from selmerge_jax.main.pretrain import make_data

    def windows(*extra):
        cfg = load_experiment(PretrainConfig, None, ["model={preset: tiny}", f"data.train_npy={npy[0]}",
                                                     f"data.validation_npy={npy[1]}", "train.seq_len=32",
                                                     "train.batch_size=4", *extra])
        train_it, eval_fn = make_data(cfg, ByteTokenizer())
        return next(train_it)["inputs"], next(iter(eval_fn()))["inputs"]

    train0, val0 = windows()
    train1, val1 = windows("train.seed=1")
    _, val2 = windows("train.seed=1", "data.validation_seed=2")
    assert not np.array_equal(train0, train1) and np.array_equal(val0, val1)
    assert not np.array_equal(val1, val2)


@pytest.mark.parametrize("script", ["eval_passkey", "eval_perplexity", "eval_loss_curves", "eval_fidelity",
                                    "eval_memory"])
def test_scripts_reject_a_bad_key_with_exit_code_2(script, monkeypatch, capsys):
    module = load_script(f"{script}.py")
    monkeypatch.chdir(ROOT)  # the default --config path is relative to the repository
    monkeypatch.setattr(sys, "argv", [script, "--set", "no_such_key=1"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2 and "no_such_key: unknown key" in capsys.readouterr().err
