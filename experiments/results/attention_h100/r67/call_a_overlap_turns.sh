#!/bin/bash
# One device call on an H100 or H200 (about 5 minutes). MosaicTiling(overlap=True), FA3's
# intra-warpgroup overlap in the forward (the next block's Q K^T issued before the previous P V is done; the
# two warpgroups take turns issuing), against the default in one process, then beside cuDNN (#24 item 2:
# forward >= 1.0x cuDNN's useful TF/s; 0.961x / 0.967x at 64K / 128K on an H100, R60):
#   1. the overlap's GPU tests (forward and LSE against the reference over five shapes, bitwise repeatable; the
#      overlapped tilings against the default, gradients included);
#   2. 64K: forward sweep default / overlap / default / overlap (median of 10 each), then the faster tiling
#      beside cuDNN dense, forward and forward + backward (median of 10);
#   3. the same at 128K.
# Each step runs only if the call has the time it needs left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
echo "== t=${SECONDS}s: pytest -m gpu -k overlap tests/test_kernels_mosaic_gpu.py" | tee -a $L
JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:xdist -m gpu -k overlap tests/test_kernels_mosaic_gpu.py \
  > $OUT/gpu_tests_overlap.txt 2>&1; echo "rc=$?" | tee -a $L
tail -n 3 $OUT/gpu_tests_overlap.txt | tee -a $L
SWEEP='[{}, {"overlap": true}, {}, {"overlap": true}]'
for spec in h100_64k h100_128k; do
  if left 100; then
    echo "== t=${SECONDS}s: $spec sweep + cuDNN" | tee -a $L
    timeout 150 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd fwdbwd \
      --mosaic-sweep "$SWEEP" --mosaic-sweep-mode fwd --sweep-reps 10 --reps 10 --warmup 2 \
      --out $OUT/overlap_${spec#h100_}.jsonl >> $L 2>&1
    echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $spec" | tee -a $L; fi
done
echo "== done t=${SECONDS}s" | tee -a $L
