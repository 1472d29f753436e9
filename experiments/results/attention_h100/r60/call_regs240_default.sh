#!/bin/bash
# R60: one device call, run on an H100 as `END=510 bash <this file>` (5.7 minutes). It makes 240 registers per compute warpgroup
# MosaicTiling's default on the device's copy (regs240_default.patch, beside this file; the tenth tiling of
# test_native_tilings_agree becomes the old 232 split) and then runs:
#   1. the gpu-marked Mosaic kernel tests (about 3.5 minutes on an H200 at 232);
#   2. the kernel beside cuDNN dense at 64K and 128K, forward and forward + backward (median of 10; #24 item 2);
#   3. the 1M MS layer: selection, forward, gradients and the Mosaic parts timed apart (#24's 0.30 s target);
#   4. 240 against 232 at 64K, forward + backward, A/B/A in one process; then the fused-dQ backward (dq_exchange)
#      at 240 and at 232, to test whether its f32 dQ work spills at 232 (untested guess; fused 27.35 ms, two passes 18.99 ms, R49).
# If step 1 passes, commit the patch with the outputs (results/attention_<device>/r60/), an R60 index row, and
# the README's kernel paragraphs rewritten where they call 240 "an option" and 232 "the default". Steps 2-4 run
# only if the call has the time they need left; step 1 has its own 290 s limit.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
P="$(dirname "$0")/regs240_default.patch"
git apply "$P" 2>/dev/null || patch -p1 --forward < "$P" || { echo "the patch did not apply" >&2; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT SCRIPT ARGS...: one benchmark invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2 script=$3; shift 3
  if left "$need"; then
    echo "== t=${SECONDS}s: $script $*" | tee -a $L
    timeout "$to" python3 $B/$script "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $script $*" | tee -a $L; fi
}
echo "== t=${SECONDS}s: pytest -m gpu tests/test_kernels_mosaic_gpu.py" | tee -a $L
JAX_PLATFORMS=cuda timeout 290 python3 -m pytest -q -p no:xdist -m gpu tests/test_kernels_mosaic_gpu.py \
  > $OUT/gpu_tests_regs240_default.txt 2>&1; echo "rc=$?" | tee -a $L
tail -n 3 $OUT/gpu_tests_regs240_default.txt | tee -a $L
step 100 130 bench_attention.py --specs h100_64k h100_128k --impls pallas_mosaic_gpu cudnn_dense --reps 10 \
  --warmup 2 --out $OUT/regs240_default_vs_cudnn.jsonl
step 100 130 bench_attention.py --mosaic-parts h100_1m --ms-layer h100_1m --layer-impl default \
  --layer-modes selection fwd grads --reps 6 --out $OUT/layer_1m_parts_regs240.jsonl
step 80 100 bench_attention.py --specs h100_64k --impls pallas_mosaic_gpu \
  --mosaic-sweep '[{}, {"compute_registers": 232}, {}, {"fused_dq": true, "dq_exchange": true},
  {"fused_dq": true, "dq_exchange": true, "compute_registers": 232}]' --mosaic-sweep-mode fwdbwd --sweep-reps 10 \
  --modes fwdbwd --reps 10 --warmup 2 --out $OUT/regs_ab_64k.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
