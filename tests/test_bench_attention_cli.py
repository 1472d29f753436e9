"""``experiments/benchmarks/bench_attention.py`` rejects what would do nothing or write broken rows (no work
asked, an unknown implementation or spec, zero repetitions, bad JSON) with exit code 2 and the allowed set."""

import importlib.util
import pathlib

import pytest

_SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "benchmarks" / "bench_attention.py"
_spec = importlib.util.spec_from_file_location("bench_attention", _SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to benchmark: give at least one of --specs, --check"),
    (["--specs", "h100_64k", "--impls", "triton"], "invalid choice: 'triton' (choose from 'pallas_triton'"),
    (["--specs", "h100_65k"], "invalid choice: 'h100_65k' (choose from 'gpu_check_8k'"),
    (["--specs", "h100_64k", "--reps", "0"], "argument --reps: 0 must be >= 1"),
    (["--specs", "h100_64k", "--warmup", "-1"], "argument --warmup: -1 must be >= 0"),
    (["--dense-lens", "0"], "argument --dense-lens: 0 must be >= 1"),
    (["--check", "gpu_check_8k", "--check-impls", "xla"],
     "invalid choice: 'xla' (choose from 'pallas_triton'"),
    (["--check", "gpu_check_8k", "--tiling", "{rows: 64}"], "argument --tiling: not JSON"),
    (["--mosaic-sweep", "[{}]", "--check", "gpu_check_8k"], "--mosaic-sweep times the first --specs entry"),
])
def test_bad_arguments_exit_2_with_the_allowed_set(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_documented_invocations_parse():
    args = bench.parse_args(["--specs", "--ms-layer", "h100_1m", "--dense-lens", "131072"])
    assert args.specs == [] and args.ms_layer == ["h100_1m"] and args.reps == 10
    args = bench.parse_args(["--specs", "h100_64k", "--impls", "pallas_mosaic_gpu", "--mosaic-sweep",
                             '[{}, {"stages": 3}]'])
    assert args.impls == ["pallas_mosaic_gpu"] and args.mosaic_sweep == '[{}, {"stages": 3}]'
