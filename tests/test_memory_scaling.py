"""Selection and attention memory of ms_attention grow linearly in T (compiled memory analysis, nothing
run)."""

import itertools

import pytest
from experiment_scripts import load_script

memory_scaling = load_script("benchmarks/memory_scaling.py")


@pytest.mark.parametrize("backward", [False, True])
def test_ms_memory_linear_dense_quadratic(backward, tmp_path):
    args = ["--lengths", "2048,4096,8192", "--block-size", "32", "--top-k", "8", "--heads", "2",
            "--head-dim", "32", "--out", str(tmp_path / "m.jsonl")] + (["--backward"] if backward else [])
    rows = memory_scaling.main(args)
    for small, big in itertools.pairwise(rows):
        assert big["ms_bytes"] / small["ms_bytes"] < 2.3  # linear (+ constant overhead)
        assert big["dense_bytes"] / small["dense_bytes"] > 3.5  # quadratic
    assert rows[-1]["dense_bytes"] > 10 * rows[-1]["ms_bytes"]
    assert (tmp_path / "m.png").stat().st_size > 0
