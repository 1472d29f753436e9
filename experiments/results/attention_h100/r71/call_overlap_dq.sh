#!/bin/bash
# One device call on an H100 (about 8 minutes): the dQ pass with each dQ product deferred a step
# (MosaicTiling.overlap_dq) against the plain dQ pass.
#   1. GPU tests: overlap_dq's outputs and gradients against the reference over five shapes (G = 1/3/4/8,
#      W = 64/128), bitwise the same on a second run (the -k filter missed the tilings-agree case: its id
#      was not readable then);
#   2. 64K and 128K: forward + backward A/B/A/B (plain, overlap_dq), median of 10 each, then the faster
#      beside cuDNN dense, forward and forward + backward (median of 20);
#   3. 1M: the forward, backward preparation, dQ and dK/dV passes apart, plain then overlap_dq.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-560}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
echo "== t=${SECONDS}s: pytest -m gpu -k overlap_dq" | tee -a $L
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:xdist -m gpu -k "overlap_dq" \
  tests/test_kernels_mosaic_gpu.py > $OUT/gpu_tests_overlap_dq.txt 2>&1; echo "rc=$?" | tee -a $L
tail -n 3 $OUT/gpu_tests_overlap_dq.txt | tee -a $L
OD='{"overlap_dq": true}'
for spec in h100_64k h100_128k; do
  if left 90; then
    echo "== t=${SECONDS}s: $spec" | tee -a $L
    timeout 130 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd fwdbwd \
      --mosaic-sweep "[{}, $OD, {}, $OD]" --mosaic-sweep-mode fwdbwd --sweep-reps 10 --reps 20 --warmup 2 \
      --out $OUT/overlap_dq_${spec#h100_}.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $spec" | tee -a $L; fi
done
for t in '{}' "$OD"; do
  if left 100; then
    echo "== t=${SECONDS}s: parts h100_1m $t" | tee -a $L
    timeout 150 python3 $B/bench_attention.py --mosaic-parts h100_1m --mosaic-tiling "$t" --reps 5 \
      --out $OUT/parts_1m.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): parts $t" | tee -a $L; fi
done
echo "== done t=${SECONDS}s" | tee -a $L
