#!/bin/bash
# One device call on an H100 (about 7 minutes): the dQ pass computing delta = rowsum(dO O) itself
# (MosaicTiling.delta_in_dq) against the XLA reduction before the passes.
#   1. GPU tests: delta_in_dq's outputs and gradients against the reference over five shapes, bitwise the same
#      on a second run (the -k filter missed the tilings-agree cases: their ids were not readable then);
#   2. 64K and 128K: forward + backward A/B/A/B (default, delta_in_dq), median of 10 each, then the faster
#      beside cuDNN dense, forward and forward + backward, median of 20, by wall clock and on the device;
#   3. 1M: the forward, the backward preparation, the dQ and dK/dV passes apart with delta_in_dq.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-520}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
echo "== t=${SECONDS}s: pytest -m gpu -k delta_in_dq" | tee -a $L
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:xdist -m gpu -k "delta_in_dq" \
  tests/test_kernels_mosaic_gpu.py > $OUT/gpu_tests_delta_in_dq.txt 2>&1; echo "rc=$?" | tee -a $L
tail -n 3 $OUT/gpu_tests_delta_in_dq.txt | tee -a $L
DD='{"delta_in_dq": true}'
for spec in h100_64k h100_128k; do
  if left 110; then
    echo "== t=${SECONDS}s: $spec" | tee -a $L
    timeout 150 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd fwdbwd \
      --mosaic-sweep "[{}, $DD, {}, $DD]" --mosaic-sweep-mode fwdbwd --sweep-reps 10 --reps 20 --warmup 2 \
      --device-time --out $OUT/delta_in_dq_${spec#h100_}.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $spec" | tee -a $L; fi
done
if left 80; then
  echo "== t=${SECONDS}s: parts h100_1m $DD" | tee -a $L
  timeout 120 python3 $B/bench_attention.py --mosaic-parts h100_1m --mosaic-tiling "$DD" --reps 5 \
    --out $OUT/parts_1m_delta_in_dq.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
else echo "== skipped (t=${SECONDS}s): parts" | tee -a $L; fi
echo "== done t=${SECONDS}s" | tee -a $L
