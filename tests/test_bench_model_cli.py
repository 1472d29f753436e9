"""``experiments/benchmarks/bench_model.py`` end to end on the CPU at the tiny preset: one MS and one dense
LoRA step side by side, the speed-up row, and the refusal of settings that cannot run."""

import json

import pytest
from experiment_scripts import load_script

bench_model = load_script("benchmarks/bench_model.py")

TINY = ["--presets", "tiny", "--lengths", "256", "--ms-kernel", "reference", "--dense-kernel", "xla",
        "--block-size", "16", "--top-k", "4", "--reps", "1", "--remat", "full"]


def test_one_invocation_times_ms_and_dense_and_writes_their_ratio(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")  # recorded in each row (a GPU flag)
    out = tmp_path / "rows.jsonl"
    bench_model.main([*TINY, "--mlp-chunk", "64", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    steps = {r["attention"]: r for r in rows if r["bench"] == "model_step"}
    assert set(steps) == {"ms", "dense"}
    for row in steps.values():
        assert row["status"] == "ok" and row["mlp_chunk"] == 64 and row["step_s"] > 0
        assert row["xla_flags"] == "--xla_gpu_enable_command_buffer="
        assert row["loss"] == pytest.approx(5.56, abs=0.1)  # ln(259): random weights, byte vocabulary
    [ratio] = [r for r in rows if r["bench"] == "model_speedup"]
    assert ratio["speedup"] == pytest.approx(steps["dense"]["step_s"] / steps["ms"]["step_s"], rel=0.01)


@pytest.mark.parametrize("extra", [["--mlp-chunk", "0"], ["--mlp-chunk", "64", "--remat", "none"]])
def test_settings_that_cannot_run_are_refused_before_any_cell(extra, capsys):
    with pytest.raises(SystemExit):
        bench_model.parse_args([*TINY, *extra])
    assert "--mlp-chunk" in capsys.readouterr().err
