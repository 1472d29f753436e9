"""``experiments/benchmarks/bench_gemm_layout.py`` on the CPU at small shapes: every variant of every shape
gets a row with its time, and the variants that transpose inside the program say so."""

import json

from experiment_scripts import load_script

bench = load_script("benchmarks/bench_gemm_layout.py")


def test_every_shape_and_variant_gets_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", (("small", 64, 128),))
    out = tmp_path / "gemm.jsonl"
    assert bench.main(["--tokens", "32", "--reps", "1", "--warmup", "0", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(bench._variants(32, 64, 128))
    assert all(r["ms"] > 0 and r["d_in"] == 64 and r["d_out"] == 128 for r in rows.values())
    assert rows["transpose"]["tflops"] is None and rows["transpose"]["moves_data"]
    assert not rows["fwd_w_in_out"]["moves_data"]
