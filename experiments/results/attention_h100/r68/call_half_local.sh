#!/bin/bash
# One device call on an H100 (about 6 minutes) at the overlapped forward whose first
# 64-token chunk multiplies only the local region's first 64 keys:
#   1. GPU tests: the default's forward and gradients against the reference over five shapes (G = 1/3/4/8,
#      W = 64/128), the other forwards;
#   2. 64K and 128K: forward A/B/A/B, the default against the ping-pong forward (overlap=False, pingpong=True),
#      median of 15 each, then the default beside cuDNN dense, forward and forward + backward (median of 20).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
echo "== t=${SECONDS}s: pytest -m gpu -k 'native_matches_reference or forward_variants'" | tee -a $L
JAX_PLATFORMS=cuda timeout 170 python3 -m pytest -q -p no:xdist -m gpu -k "native_matches_reference or forward_variants" \
  tests/test_kernels_mosaic_gpu.py > $OUT/gpu_tests_half_local.txt 2>&1; echo "rc=$?" | tee -a $L
tail -n 3 $OUT/gpu_tests_half_local.txt | tee -a $L
PP='{"overlap": false, "pingpong": true}'
for spec in h100_64k h100_128k; do
  if left 80; then
    echo "== t=${SECONDS}s: $spec" | tee -a $L
    timeout 120 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd fwdbwd \
      --mosaic-sweep "[{}, $PP, {}, $PP]" --mosaic-sweep-mode fwd --sweep-reps 15 --reps 20 --warmup 2 \
      --out $OUT/half_local_${spec#h100_}.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $spec" | tee -a $L; fi
done
echo "== done t=${SECONDS}s" | tee -a $L
