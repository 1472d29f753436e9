"""``experiments/benchmarks/gpu_plan.py`` without the CUDA plugin (as on CI): its arguments, the target
descriptions, the HLO counts, and the clear error where the plugin is missing. The deviceless compile itself
needs ``jax-cuda12-plugin`` and is exercised by the results it wrote (R53)."""

import pytest
from experiment_scripts import load_script

from selmerge_jax.kernels.target import Target

load_script("benchmarks/bench_model.py")  # gpu_plan imports it by name, as when run beside it
gpu_plan = load_script("benchmarks/gpu_plan.py")


def test_its_options_join_bench_models():
    args = gpu_plan.parse_args(["--target", "h100", "--dump", "/tmp/x", "--presets", "llama3-8b",
                                "--lengths", "131072", "--remat", "full", "--mlp-chunk", "16384"])
    assert (args.target, args.dump, args.triton_gemm) == ("h100", "/tmp/x", False)
    assert (args.presets, args.lengths, args.remat) == (("llama3-8b",), (131072,), "full")
    assert args.mlp_chunk == 16384


def test_targets_are_hopper_descriptions_or_files(tmp_path):
    for name in ("h100", "h200"):
        text = gpu_plan.target_config(name)
        assert "core_count: 132" in text and "major: 9" in text and 'platform_name: "CUDA"' in text
        assert gpu_plan.target_of(text) == Target("gpu", compute_capability="9.0", core_count=132)
    custom = tmp_path / "gpu.txtpb"
    custom.write_text("gpu_device_info { core_count: 114 cuda_compute_capability { major: 9 } }")
    assert gpu_plan.target_of(gpu_plan.target_config(str(custom))).core_count == 114
    with pytest.raises(ValueError, match=r"compute capability 8.0, core_count 108; allowed: a 9.x GPU"):
        gpu_plan.target_of("gpu_device_info { core_count: 108 "
                           "cuda_compute_capability { major: 8 minor: 0 } }")
    with pytest.raises(ValueError, match=r"--target='b200': neither one of \['h100', 'h200'\] nor a file"):
        gpu_plan.target_config("b200")


def test_without_the_cuda_plugin_it_says_what_to_install():
    if gpu_plan.has_cuda_plugin():
        pytest.skip("the CUDA plugin is installed here")
    with pytest.raises(RuntimeError, match=r"pip install 'jax-cuda12-plugin==.*' 'jax-cuda12-pjrt=="):
        gpu_plan.topology_sharding(gpu_plan.target_config("h200"))


def test_hlo_counts():
    text = """
  %custom-call.1 = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  %m = (bf16[8,8]{1,0}, f32[8]{0}) custom-call(%q), custom_call_target="mosaic_gpu_v2"
  %c = bf16[8,8]{1,0} copy(%x)
  %w = (s32[], bf16[8,8]{1,0}) while(%t), condition=%cond, body=%body
  %f = (bf16[8]{0}, u8[0]{0}) custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax"
"""
    assert gpu_plan.hlo_counts(text) == {"cublas_calls": 1, "mosaic_gpu_calls": 1, "cudnn_calls": 1,
                                         "copies": 1, "while_loops": 1}
