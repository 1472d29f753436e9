#!/bin/bash
# One device call on an H100 (about 8 minutes), with MosaicTiling's new forward default
# (overlap=True, pingpong=False: the overlapped step loop, warpgroups free-running):
#   1. the gpu-marked Mosaic kernel tests (the default's forward and gradients against the reference over five
#      shapes, the other forwards, every tiling against the default);
#   2. the kernel beside cuDNN dense at 64K and 128K, forward and forward + backward (median of 20; #24 item 2:
#      forward >= 1.0x, forward + backward >= 0.9x cuDNN's useful TF/s);
#   3. the 1M MS layer: selection, forward and gradients, and the Mosaic parts apart (#24's 0.30 s).
# Steps 2-3 run only if the call has the time they need left; step 1 has its own 250 s limit.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT ARGS...: one bench_attention.py invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== t=${SECONDS}s: $*" | tee -a $L
    timeout "$to" python3 $B/bench_attention.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
echo "== t=${SECONDS}s: pytest -m gpu tests/test_kernels_mosaic_gpu.py" | tee -a $L
JAX_PLATFORMS=cuda timeout 250 python3 -m pytest -q -p no:xdist -m gpu tests/test_kernels_mosaic_gpu.py \
  > $OUT/gpu_tests_overlap_default.txt 2>&1; echo "rc=$?" | tee -a $L
tail -n 3 $OUT/gpu_tests_overlap_default.txt | tee -a $L
step 90 120 --specs h100_64k h100_128k --impls pallas_mosaic_gpu cudnn_dense --reps 20 --warmup 2 \
  --out $OUT/overlap_default_vs_cudnn.jsonl
step 100 130 --mosaic-parts h100_1m --ms-layer h100_1m --layer-impl default --layer-modes selection fwd grads \
  --reps 6 --out $OUT/layer_1m_overlap_default.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
