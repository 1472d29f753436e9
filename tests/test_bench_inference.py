"""experiments/benchmarks/bench_inference.py: the issue-23 grid is planned cell by cell (refused cells become
rows naming their estimate and the largest prompt that fits), and the tiny CPU mode runs every variant end to
end (MS and dense one-pass prefill, MS prefill compressing into a budget, dense and selective decode)."""

import json

import pytest
from experiment_scripts import load_script

bench = load_script("benchmarks/bench_inference.py")


def test_dry_run_plans_the_issue_grid_and_refuses_what_does_not_fit(tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = bench.main(["--grid", "issue23", "--dry-run", "--capacity-gb", "141", "--out", str(out)])
    cells = {(r["seq_len"], r["batch"], r["prefill"]): r for r in rows}
    want = {(t, 1) for t in (8192, 32768, 131072, 524288, 1048576)} | {(32768, 4), (131072, 4)}
    assert {(t, b) for t, b, _ in cells} == want
    assert {v for *_, v in cells} == {"ms", "dense", "ms+budget"}
    full_1m = cells[(1048576, 1, "ms")]  # a bf16 cache of 1M tokens alone is 131 GB
    assert full_1m["status"] == "refused" and 0 < full_1m["largest_prompt_that_fits"] < 1048576
    assert "cache 131.0" in full_1m["estimate"]
    # A 4K budget leaves a 0.7 GB cache and the one-pass prefill's per-token arrays (~39 GiB at 1M tokens):
    # planned, as is a full cache of 512K tokens (measured on an H200: 48.2 and 96.9 GiB at their peaks).
    assert cells[(1048576, 1, "ms+budget")]["status"] == "planned"
    assert cells[(524288, 1, "ms")]["status"] == "planned"
    assert cells[(131072, 1, "ms")]["status"] == "planned"
    assert len(out.read_text().splitlines()) == len(rows)


def test_bad_arguments_exit_naming_the_value():
    with pytest.raises(SystemExit):
        bench.parse_args(["--prefill", "ms,flash"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--policy", "snap"])


@pytest.mark.slow
def test_tiny_cpu_mode_runs_every_variant(tmp_path):
    out = tmp_path / "rows.jsonl"
    bench.main(["--preset", "tiny", "--lengths", "64", "--batches", "2", "--new", "3", "--block-size", "16",
                "--top-k", "3", "--budget", "32", "--ms-kernel", "reference", "--capacity-gb", "8",
                "--out", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ok = {r["prefill"]: r for r in rows if r["bench"] == "inference"}
    assert {r["status"] for r in ok.values()} == {"ok"}
    assert all(r["ttft_s"] > 0 and r["decode_ms_per_token"] > 0 for r in ok.values())
    assert ok["ms"]["select_decode_ms_per_token"] > 0 and ok["ms+budget"]["select_decode_ms_per_token"] > 0
    assert ok["ms+budget"]["cache_gb"] < ok["ms"]["cache_gb"] or ok["ms"]["cache_gb"] == 0.0
    speed = [r for r in rows if r["bench"] == "inference_speedup"]
    assert len(speed) == 1 and speed[0]["kl_ms_vs_dense_last_token"] >= 0
