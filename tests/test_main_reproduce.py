"""What the H100 reproduction study (``main.reproduce``) adds: passkey mixing in the numpy loader (and the
runner's npy branch), the CRD NTK inference rule when a study loads a CRD checkpoint, teacher-forced passkey
scoring, and the time-bounded study driver end to end on CPU at micro size (slow)."""

import os
import pathlib

import numpy as np
import pytest

from selmerge_jax.data.arrays import TokenWindows
from selmerge_jax.data.synthetic import PASSKEY_QUESTION
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.evaluation import passkey
from selmerge_jax.evaluation.common import ModelSource, crd_inference_rope, load_model
from selmerge_jax.main import reproduce
from selmerge_jax.main.config import FinetuneConfig, PretrainConfig, load_experiment
from selmerge_jax.main.finetune import run_finetune
from selmerge_jax.main.pretrain import make_data
from selmerge_jax.models.config import preset
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig

ROOT = pathlib.Path(__file__).parents[1]
TOK = ByteTokenizer()
MICRO = preset("tiny", d_model=32, ffn_dim=64, num_layers=1, attention="dense")
CRD = ("crd={cycle: 1024, original_max_position_embeddings: 320, initial_scale: 1.0, growth: 1.0, "
       "inference_scale: 4.0}")


@pytest.fixture(scope="module")
def tokens():
    text = (ROOT / "selmerge_jax" / "training" / "loop.py").read_text()
    return TOK.encode(text * 3, add_bos=True, add_eos=True).astype(np.uint16)


@pytest.fixture(scope="module")
def npy(tmp_path_factory, tokens):
    d = tmp_path_factory.mktemp("tokens")
    np.save(d / "train.npy", tokens)
    np.save(d / "validation.npy", tokens[::-1].copy())
    return str(d / "train.npy"), str(d / "validation.npy")


def _is_passkey(row) -> bool:
    return PASSKEY_QUESTION in TOK.decode(row)


def _windows(tokens, **kw):
    return TokenWindows(tokens, seq_len=320, batch_size=8, bos_id=TOK.bos_id, seed=5, tokenizer=TOK, **kw)


# ---- passkey mixing in TokenWindows
# -------------------------------------------------------------------------

def test_passkey_mixing_replaces_whole_rows_deterministically(tokens):
    it = _windows(tokens, passkey_ratio=0.5)
    batches = [next(it) for _ in range(6)]
    mixed = [[_is_passkey(np.append(r[:1], t)) for r, t in zip(b["inputs"], b["targets"], strict=True)]
             for b in batches]
    share = np.mean(mixed)
    assert 0.25 < share < 0.75, share
    plain = _windows(tokens)  # ratio 0: the corpus windows, in the same order
    for b, p, m in zip(batches, (next(plain) for _ in range(6)), mixed, strict=True):
        assert b["inputs"].shape == (8, 320) and b["inputs"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        keep = ~np.asarray(m)
        np.testing.assert_array_equal(b["inputs"][keep], p["inputs"][keep])
        for row in np.flatnonzero(m):  # one document from bos: segment 1, positions 0..T-1
            assert b["inputs"][row, 0] == TOK.bos_id
            np.testing.assert_array_equal(b["segment_ids"][row], np.ones(320))
            np.testing.assert_array_equal(b["positions"][row], np.arange(320))
        assert b["loss_mask"].all()


# (resume exactness of passkey mixing: tests/test_data_copy_rows.py::test_mixed_rows_resume_exactly)


@pytest.mark.parametrize("kw, message", [
    ({"passkey_ratio": 1.0}, r"passkey_ratio=1\.0: must be a number in \[0, 1\)"),
    ({"passkey_ratio": True}, "passkey_ratio=True: must be a number"),
    ({"passkey_ratio": 0.2, "tokenizer": None}, "needs the tokenizer"),
    ({"passkey_ratio": 0.2, "seq_len": 100}, "too short"),
])
def test_passkey_mixing_bad_arguments(tokens, kw, message):
    args = {"seq_len": 320, "batch_size": 2, "bos_id": TOK.bos_id, "tokenizer": TOK, **kw}
    with pytest.raises(ValueError, match=message):
        TokenWindows(tokens, **args)


def test_runner_npy_branch_mixes_training_windows_only(npy):
    cfg = load_experiment(PretrainConfig, None, ["model={preset: tiny}", f"data.train_npy={npy[0]}",
                                                 f"data.validation_npy={npy[1]}", "data.passkey_ratio=0.5",
                                                 "train.seq_len=320", "train.batch_size=8"])
    train_it, eval_fn = make_data(cfg, TOK)
    train_rows = [_is_passkey(r) for _ in range(3) for r in next(train_it)["inputs"]]
    val_rows = [_is_passkey(r) for b in eval_fn() for r in b["inputs"]]
    assert any(train_rows) and not any(val_rows)


# ---- the CRD NTK inference rule in load_model
# ----------------------------------------------------------------

def test_crd_inference_rope_from_stored_config():
    assert crd_inference_rope({"model": {}}) is None and crd_inference_rope({"crd": None}) is None
    rope = crd_inference_rope({"crd": {"inference_scale": 16.0, "theta": 500.0}})
    assert rope == RopeConfig(rope_type="ntk", theta=500.0, factor=16.0)


@pytest.fixture(scope="module")
def crd_checkpoint(tmp_path_factory, npy):
    out = tmp_path_factory.mktemp("crd")
    cfg = load_experiment(FinetuneConfig, None, [
        "model={preset: tiny, d_model: 32, ffn_dim: 64, num_layers: 1}", CRD, f"data.train_npy={npy[0]}",
        f"data.validation_npy={npy[1]}", "train.seq_len=64", "train.batch_size=8", "train.steps=1",
        "train.eval_batches=0", "train.progress=false", "optimizer.warmup_steps=0",
        "checkpoint.async_save=false", f"train.output_dir={out}"])
    run_finetune(cfg)
    return str(out / "checkpoints")


def test_load_model_applies_the_crd_rule_unless_overridden(crd_checkpoint):
    init = InitConfig(kind="checkpoint", path=crd_checkpoint)
    rope = load_model(ModelSource(init=init)).config.rope
    assert rope == RopeConfig(rope_type="ntk", factor=4.0)  # theta * A^(d/(d-2)) with A = inference_scale
    other = RopeConfig(rope_type="ntk", factor=2.0)
    assert load_model(ModelSource(init=init, rope=other)).config.rope == other


# ---- teacher-forced passkey scoring
# ---------------------------------------------------------------------------

def test_forward_scoring_matches_greedy_decoding_on_its_first_token():
    from flax import nnx

    from selmerge_jax.models import Llama

    model = Llama(MICRO, rngs=nnx.Rngs(3))
    kw = {"per_cell": 2, "seed": 1, "chunk_size": 96}
    fwd = passkey.passkey_accuracy(model, TOK, [288], [0.0, 1.0], scoring="forward", **kw)
    gen = passkey.passkey_accuracy(model, TOK, [288], [0.0, 1.0], scoring="generate", **kw)
    for f, g in zip(fwd["examples"], gen["examples"], strict=True):
        assert f["passkey"] == g["passkey"] and f["generated"][0] == g["generated"][0]
        assert f["exact"] == g["exact"]
    with pytest.raises(ValueError, match="scoring='beam'"):
        passkey.passkey_accuracy(model, TOK, [288], [0.0], scoring="beam")


# ---- the study driver
# -----------------------------------------------------------------------------------------

def test_reproduction_config_checks_names():
    with pytest.raises(ValueError, match="crd_pair='nope' must name one of the variants"):
        reproduce.ReproductionConfig(variants={"a": []}, crd_pair="nope", fidelity_variant="a",
                                        crd_overrides=(CRD,))
    with pytest.raises(ValueError, match="crd_overrides must set the crd section"):
        reproduce.ReproductionConfig(variants={"a": []}, crd_pair="a", fidelity_variant="a")
    with pytest.raises(ValueError, match="passkey_scoring"):
        reproduce.ReproductionConfig(variants={"a": []}, crd_pair="a", fidelity_variant="a",
                                        crd_overrides=(CRD,), passkey_scoring="x")


def test_acceptance_checks():
    runs = {"dense": {"attention": "dense", "attended_fraction": 1.0, "final_val_loss": 2.00},
            "k4": {"attention": "ms", "attended_fraction": 0.1, "final_val_loss": 2.05},
            "k8": {"attention": "ms", "attended_fraction": 0.2, "final_val_loss": 2.02}}
    out = reproduce.acceptance(runs, {"2048": 1.0, "4096": 0.9}, 256)
    assert out["a"]["pass"] and out["a"]["relative_gap_to_dense"]["k4"] == pytest.approx(0.025)
    assert out["b"]["pass"] and out["b"]["order"] == ["k4", "k8", "dense"]
    assert out["c"] == {"pass": False, "length": 4096, "accuracy": 0.9}
    runs["k8"]["final_val_loss"] = 2.06
    assert not reproduce.acceptance(runs, None, None)["b"]["pass"]


def test_passkey_stage_uses_the_runs_tokenizer(tmp_path, monkeypatch):
    cfg = reproduce.ReproductionConfig(variants={"a": []}, crd_pair="a", fidelity_variant="a",
                                       crd_overrides=(CRD,), passkey_lengths=(320,), passkey_min_s=0,
                                       fidelity_min_s=0, run_dir=str(tmp_path),
                                       output_dir=str(tmp_path / "out"))
    for name in ("crd", "a"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    asked = []
    monkeypatch.setattr(reproduce, "_passkey_models", lambda c: {})
    monkeypatch.setattr(reproduce, "load_tokenizer", lambda path=None: asked.append(path) or TOK)
    data = reproduce.DataConfig(tokenizer="/tok/tokenizer.json")
    reproduce._passkey_stage(cfg, reproduce._Clock(60.0), {}, data)
    assert asked == ["/tok/tokenizer.json"]


@pytest.mark.parametrize("compressions, passkey_runs", [((), True), (None, False)])
def test_passkey_stage_keeps_time_for_fidelity_only_when_it_will_run(tmp_path, monkeypatch, compressions,
                                                                      passkey_runs):
    """A large fidelity_min_s reserves time after every passkey length; an empty ``compressions`` (the way to
    skip fidelity) reserves none, so the grid runs (pk8 lost its grid to the reservation)."""
    kw = {} if compressions is None else {"compressions": compressions}
    cfg = reproduce.ReproductionConfig(variants={"a": []}, crd_pair="a", fidelity_variant="a",
                                          crd_overrides=(CRD,), passkey_lengths=(320,), passkey_min_s=1,
                                          fidelity_min_s=200, run_dir=str(tmp_path),
                                          output_dir=str(tmp_path / "out"), **kw)
    for name in ("crd", "a"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(reproduce, "_passkey_models", lambda c: {})
    clock = reproduce._Clock(60.0)
    reproduce._passkey_stage(cfg, clock, {}, reproduce.DataConfig())
    reproduce._fidelity_stage(cfg, clock, {})
    passkey_log, fidelity_log = clock.log[0], clock.log[-1]
    assert passkey_log["stage"] == "passkey 320" and passkey_log.get("skipped", False) != passkey_runs
    assert fidelity_log["stage"] == "fidelity" and fidelity_log["skipped"]
    if passkey_runs:
        assert fidelity_log["why"] == "no compressions configured"


def test_fidelity_stage_reads_the_fidelity_variants_data(tmp_path, monkeypatch):
    from selmerge_jax.evaluation import fidelity

    cfg = reproduce.ReproductionConfig(
        base_config="demo", variants={"a": [], "f": [
            "data.train_npy=/data/f_train.npy", "data.validation_npy=/data/f_val.npy"]}, crd_pair="a",
        fidelity_variant="f", crd_overrides=(CRD,),
        fidelity_min_s=0, run_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    (tmp_path / "f" / "checkpoints").mkdir(parents=True)
    seen = []
    monkeypatch.setattr(fidelity, "run_fidelity", lambda fcfg, stop: seen.append(fcfg.data) or {"table": ""})
    reproduce._fidelity_stage(cfg, reproduce._Clock(60.0), {})
    assert [d.validation_npy for d in seen] == ["/data/f_val.npy"]


@pytest.mark.slow
def test_reproduction_study_end_to_end(tmp_path, npy):
    base = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.ffn_dim=64", "model.ms_kernel=reference", "train.compute_dtype=float32",
            "train.seq_len=320",
            "train.batch_size=8", "train.steps=2", "train.log_every=1", "train.eval_batches=1",
            "optimizer.warmup_steps=1", "model.ms.block_size=32", "data.passkey_ratio=0.5",
            f"data.train_npy={npy[0]}", f"data.validation_npy={npy[1]}", "checkpoint.async_save=false"]
    cfg = reproduce.ReproductionConfig(
        base_config=str(ROOT / "experiments" / "configs" / "gpu_25m_ms.yaml"), base_overrides=tuple(base),
        variants={"ms": ["model.ms.top_k=2"], "dense": ["model.attention=dense"]}, crd_pair="ms",
        crd_overrides=(CRD,), passkey_lengths=(320, 640), passkey_depths=(0.0, 1.0), passkey_per_cell=1,
        fidelity_variant="dense", fidelity_prompt_tokens=128, fidelity_num_prompts=1,
        fidelity_max_new_tokens=4,
        compressions=(reproduce.KVCompressionConfig(policy="h2o", ratio=0.5, slack=64, window=8),),
        train_min_s=0, eval_reserve_s=0, passkey_min_s=0, fidelity_min_s=0,
        run_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"))
    status = reproduce.run_reproduction(cfg)
    out = tmp_path / "out"
    for name in ("study.json", "loss_curves.json", "loss_curves.png", "passkey_crd.png", "passkey_ms.json",
                 "fidelity.json", "metrics/crd.jsonl"):
        assert (out / name).exists(), name
    assert set(status["family"]) == {"ms", "dense"} and np.isfinite(status["crd_run"]["final_val_loss"])
    assert set(status["passkey"]["crd"]) == {"320", "640"}
    assert status["passkey_rope"]["crd"] == status["passkey_rope"]["ms"]  # the twin gets the CRD run's rule
    assert status["acceptance"]["b"] is not None and not any(s.get("skipped") for s in status["stages"])


def _warm_study(tmp_path, npy, **kw):
    base = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.ffn_dim=64", "model.attention=dense", "train.compute_dtype=float32", "train.seq_len=320",
            "train.batch_size=8", "train.steps=2", "train.log_every=1", "train.eval_batches=1",
            "optimizer.warmup_steps=1", "data.passkey_ratio=0.5", "data.document_masking=true",
            f"data.train_npy={npy[0]}", f"data.validation_npy={npy[1]}", "checkpoint.async_save=false"]
    kw = {"variants": {"plain": []}, "crd_pair": "plain", "fidelity_variant": "plain",
          "warm_start": ("train.seq_len=288", "train.steps=12", "optimizer.learning_rate=0.02"), **kw}
    return reproduce.ReproductionConfig(
        base_config=str(ROOT / "experiments" / "configs" / "gpu_25m_ms.yaml"), base_overrides=tuple(base),
        crd_overrides=(CRD,), passkey_lengths=(320,), passkey_depths=(0.0,),
        passkey_per_cell=1, passkey_scoring="generate", fidelity_prompt_tokens=128,
        fidelity_num_prompts=1, fidelity_max_new_tokens=2,
        compressions=(reproduce.KVCompressionConfig(policy="h2o", ratio=0.5, slack=64, window=8),),
        train_min_s=0, eval_reserve_s=0, passkey_min_s=0, fidelity_min_s=0,
        run_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"), **kw)


def test_warm_start_configs_share_one_checkpoint(tmp_path, npy):
    cfg = _warm_study(tmp_path, npy)
    warm, twin, crd = cfg.warm_config(), cfg.variant_config("plain"), cfg.crd_config()
    assert isinstance(warm, PretrainConfig) and warm.train.seq_len == 288 and warm.train.steps == 12
    ckpt = str(tmp_path / "runs" / "warm" / "checkpoints")
    for run in (twin, crd):  # both fine-tune from warm at the study's length; only the CRD run has CRD NTK
        assert isinstance(run, FinetuneConfig) and run.init == InitConfig(kind="checkpoint", path=ckpt)
        assert run.train.seq_len == 320 and run.data.document_masking
    assert twin.crd is None and crd.crd is not None
    scratch = _warm_study(tmp_path, npy, warm_start=())
    assert scratch.warm_config() is None and scratch.crd_config().init.kind == "scratch"
    assert not isinstance(scratch.variant_config("plain"), FinetuneConfig)
    with pytest.raises(ValueError, match=r"may not be named \['warm'\]"):
        _warm_study(tmp_path, npy, variants={"warm": []}, crd_pair="warm", fidelity_variant="warm")


def test_warm_start_study_end_to_end(tmp_path, npy):
    status = reproduce.run_reproduction(_warm_study(tmp_path, npy))
    order = [s["stage"] for s in status["stages"]]
    assert order[:3] == ["train warm", "train plain", "train crd"], order
    assert not any(s.get("failed") or s.get("skipped") for s in status["stages"]), status["stages"]
    assert status["warm_run"]["seq_len"] == 288 and set(status["passkey"]["crd"]) == {"320"}
    import json
    family = json.loads((tmp_path / "out" / "loss_curves.json").read_text())
    assert family["warm_started"] == ["plain"]  # the plotted twin is labelled as fine-tuned from warm
    # the twin starts from warm's weights: its first loss (learning rate 0 at step 1) is near warm's last one,
    # far below a fresh init's ~log(256)
    def losses(name):
        text = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [float(line.split('"loss": ')[1].split(",")[0]) for line in text if '"loss": ' in line]
    warm_last, twin_first = losses("warm")[-1], losses("plain")[0]
    assert warm_last < np.log(256) - 1.0 and abs(twin_first - warm_last) < 0.5, (warm_last, twin_first)


def test_warm_started_twin_is_left_out_of_the_acceptance_checks(tmp_path, npy):
    """With warm_start the twin fine-tunes from a pretrained model while the other variants train from
    scratch, so its validation loss is no like-for-like point for (a)/(b); it stays in the family rows, not in
    the checks."""
    cfg = _warm_study(tmp_path, npy, variants={"plain": [], "ms": ["model.attention=ms"]})
    row = lambda attention, frac, val: {"attention": attention, "attended_fraction": frac,
                                        "final_val_loss": val,
                                        "tokens": 1, "tokens_per_s": 1.0, "params": 1}
    runs = {"plain": row("dense", 1.0, 1.0), "ms": row("ms", 0.1, 2.0)}
    os.makedirs(cfg.output_dir, exist_ok=True)
    status = {"seq_len": 320}
    reproduce._write_status(cfg, reproduce._Clock(60), status, runs)
    assert set(status["family"]) == {"plain", "ms"}
    assert status["acceptance"]["a"] is None and status["acceptance"]["b"] is None, status["acceptance"]
    scratch = _warm_study(tmp_path, npy, variants={"plain": [], "ms": ["model.attention=ms"]}, warm_start=())
    status = {"seq_len": 320}
    reproduce._write_status(scratch, reproduce._Clock(60), status, runs)
    assert status["acceptance"]["b"] is not None  # from scratch the twin is a family run like any other


def test_warm_start_with_other_parameter_shapes_fails_before_training(tmp_path, npy):
    cfg = _warm_study(tmp_path, npy, warm_start=("train.steps=12", "model.d_model=64"))
    with pytest.raises(ValueError, match=r"warm_start: .* differ in parameter shapes .*d_model"):
        cfg.warm_config()


# ---- the command's exit status (issue #21)
# -------------------------------------------------------------------------

def _run_script(monkeypatch, args):
    """experiments/eval_reproduction.py's main() in this process: its SystemExit, or None."""
    import runpy
    monkeypatch.setattr("sys.argv", ["eval_reproduction.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "experiments" / "eval_reproduction.py"), run_name="__main__")
        raise SystemExit(0)
    return exit_info.value.code


def test_missing_data_is_named_with_the_command_that_writes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no .gpu_data here: the CPU dry run reads gpu_25m_ms.yaml's .npy paths
    code = _run_script(monkeypatch, [
        "--config", str(ROOT / "experiments" / "configs" / "eval_reproduction_cpu.yaml"),
        "--set", f"base_config={ROOT / 'experiments' / 'configs' / 'gpu_25m_ms.yaml'}",
        "--set", f"output_dir={tmp_path / 'out'}", "--set", f"run_dir={tmp_path / 'runs'}"])
    assert isinstance(code, str) and len(code.splitlines()) == 1, code  # SystemExit(str): exit status 1
    assert ".gpu_data/train.npy" in code and "--export-npy .gpu_data" in code
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_failed_stage_exits_non_zero_with_one_line(tmp_path, monkeypatch, capsys):
    status = {"stages": [{"stage": "train ms_k4", "failed": "ValueError: bad shape\nmore detail"},
                         {"stage": "train crd", "seconds": 1.0},
                         {"stage": "fidelity", "failed": "OSError: disk"}]}
    assert reproduce.failure({"stages": [{"stage": "x", "seconds": 1}]}) is None
    monkeypatch.setattr(reproduce, "run_reproduction", lambda cfg: status)
    code = _run_script(monkeypatch, ["--config", str(ROOT / "experiments" / "configs" /
                                                     "eval_reproduction_cpu.yaml")])
    assert code == ("eval_reproduction: stage 'train ms_k4' failed: ValueError: bad shape (and 1 more: "
                    "fidelity); details in study.json and the log above")
