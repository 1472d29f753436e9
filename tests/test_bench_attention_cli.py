"""``experiments/benchmarks/bench_attention.py`` rejects what would do nothing or write broken rows (no work
asked, an unknown implementation or spec, zero repetitions, bad JSON) with exit code 2 and the allowed set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from experiment_scripts import load_script

from selmerge_jax.kernels.block_sparse_attention import block_sparse_attention_reference
from selmerge_jax.kernels.block_sparse_attention.specs import get_spec

bench = load_script("benchmarks/bench_attention.py")


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


def test_ratio_rows_divide_by_the_peers_of_the_same_spec_and_mode():
    rows = [{"spec": "s", "mode": "fwd", "impl": "pallas_mosaic_gpu", "tflops_useful": 500.0, "ms": 2.0},
            {"spec": "s", "mode": "fwd", "impl": "cudnn_dense", "tflops_useful": 625.0, "ms": 30.0},
            {"spec": "s", "mode": "fwd", "impl": "flex_attention", "tflops_useful": 400.0, "ms": 2.5},
            {"spec": "s", "mode": "fwdbwd", "impl": "pallas_mosaic_gpu", "tflops_useful": 300.0, "ms": 9.0},
            {"spec": "s", "mode": "fwd", "impl": "flex_attention", "error": "no GPU"}]
    fwd, fwdbwd = bench.ratio_rows(rows)
    assert fwd["tflops_vs_cudnn_dense"] == 0.8 and fwd["tflops_vs_flex_attention"] == 1.25
    assert fwd["flex_attention_ms"] == 2.5 and fwd["cudnn_dense_tflops"] == 625.0
    assert fwdbwd["mode"] == "fwdbwd" and "tflops_vs_cudnn_dense" not in fwdbwd
    assert "tflops_vs_cudnn_dense_device" not in fwd  # no device times: no device ratio


def test_ratio_rows_from_device_times_where_both_have_them():
    """``--device-time``: the ratio of the device-time rates beside the wall-clock one; a peer without a
    device time (FlexAttention runs in its own process) gets the wall-clock ratio only."""
    rows = [{"spec": "s", "mode": "fwd", "impl": "pallas_mosaic_gpu", "tflops_useful": 500.0, "ms": 2.0,
             "tflops_useful_device": 550.0, "ms_device": 1.8},
            {"spec": "s", "mode": "fwd", "impl": "cudnn_dense", "tflops_useful": 625.0, "ms": 30.0,
             "tflops_useful_device": 500.0, "ms_device": 29.9},
            {"spec": "s", "mode": "fwd", "impl": "flex_attention", "tflops_useful": 400.0, "ms": 2.5}]
    (row,) = bench.ratio_rows(rows)
    assert row["tflops_vs_cudnn_dense"] == 0.8 and row["tflops_vs_cudnn_dense_device"] == 1.1
    assert row["cudnn_dense_ms_device"] == 29.9 and row["ms_device"] == 1.8
    assert row["tflops_vs_flex_attention"] == 1.25 and "tflops_vs_flex_attention_device" not in row
    assert bench.parse_args(["--specs", "h100_64k", "--device-time"]).device_time


def test_measure_with_device_time_on_cpu_keeps_the_wall_clock_row():
    """A trace without device kernels (the CPU) gives no device time, and the wall-clock figures stand."""
    import io

    fn = jax.jit(lambda x: x @ x)
    row = bench.measure({"kind": "kernel"}, fn, (jnp.ones((64, 64)),), 2.0 * 64 ** 3, 2, 1, io.StringIO(),
                        device=True)
    assert row["ms"] > 0 and row["tflops_useful"] is not None
    assert row["ms_device"] is None and row["tflops_useful_device"] is None


def test_selection_inside_times_the_op_and_its_kernel_on_fresh_inputs():
    from selmerge_jax.attention import MSAttentionConfig
    from selmerge_jax.kernels.block_sparse_attention.specs import get_spec

    spec = get_spec("tiny_g4_h64_w64")
    cfg = MSAttentionConfig(block_size=spec.block_size, top_k=spec.selected + 1, selection_heads="kv")
    row = bench.selection_inside(spec, cfg, "xla", "ms_attention+xla", reps=2)
    assert row["kind"] == "selection_share_inside" and row["reps"] == 2
    assert row["op_fwd_ms"] > 0 and row["kernel_fwd_ms"] > 0
    # the share comes from the unrounded medians, the ms fields are rounded to 4 decimals
    assert row["selection_share"] == pytest.approx(1 - row["kernel_fwd_ms"] / row["op_fwd_ms"], abs=1e-3)


@pytest.mark.parametrize("name", ["tiny_g4_h64_w64", "tiny_g1_h128_w128"])
def test_layout_probe_poses_the_same_problem_head_major(name):
    """``--layout-probe``'s head-major relayout (each kv head a batch row) is the same attention: the
    reference on it gives the token-major outputs, re-laid out; and the flag parses."""
    spec = get_spec(name)
    q, k, v, plan, do = spec.make_inputs(jax.random.PRNGKey(0))
    hq, hk, hv, hdo, regions = bench.head_major(q, k, v, do, plan.kv_regions)
    assert hq.shape == (spec.kv_heads, spec.seq_len, spec.q_heads // spec.kv_heads, spec.head_dim)
    assert hk.shape == (spec.kv_heads, spec.seq_len, 1, spec.head_dim) and hdo.shape == hq.shape
    want = block_sparse_attention_reference(q, k, v, plan)
    got = block_sparse_attention_reference(hq, hk, hv, plan.__class__(regions, block_size=plan.block_size,
                                                                       merge=plan.merge))
    back, *_ = bench.head_major(want, k, v, do, plan.kv_regions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(back), rtol=1e-6, atol=1e-6)
    assert bench.parse_args(["--layout-probe", "h100_64k"]).layout_probe == ["h100_64k"]


def test_ms_layer_rows_with_a_kernel_trace_per_mode(tmp_path):
    """``--ms-layer ... --kernels-to DIR``: each timed mode gets one more traced call and a
    ``kind: ms_layer_trace`` row; on the CPU the trace has no device stream, which the row says, and the
    timed rows stand."""
    import io
    import json

    args = bench.parse_args(["--ms-layer", "tiny_g4_h64_w64", "--layer-impl", "xla", "--layer-modes", "fwd",
                             "--reps", "2", "--kernels-to", str(tmp_path), "--device-time"])
    out = io.StringIO()
    bench.bench_ms_layer("tiny_g4_h64_w64", args, bench.TritonTiling(), out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["kind"] for r in rows] == ["ms_layer", "ms_layer_trace"]
    assert rows[0]["mode"] == "fwd" and rows[0]["ms"] > 0 and rows[0]["ms_device"] is None
    assert rows[1]["mode"] == "fwd" and "no device kernel stream" in rows[1]["trace_error"]
    assert bench.parse_args(["--ms-layer", "h100_1m", "--layer-impl", "pallas_mosaic_gpu", "--mosaic-tiling",
                             '{"delta_in_dq": true}']).layer_impl == "pallas_mosaic_gpu"
