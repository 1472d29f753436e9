#!/bin/bash
# Ran as R70 (experiments/results/INDEX.md#r70): one device call on an H100 or H200 (about 4 minutes). Does the kernels' memory layout
# cost them? K/V and Q/dO are token-major ([B, T, N, H]): one kv head's 128-token region is 128 rows of 256
# bytes, K*H*2 bytes apart, read in plan order (random), while cuDNN streams neighbouring rows. The MS
# forward's rate moved up to 10% between invocations on one H100 where cuDNN's did not (R69).
# bench_attention.py --layout-probe times the same problem with each kv head as a batch row (each region one
# contiguous 32 KiB block; same work items in the same order), A/B/A/B in one process, forward and forward +
# backward. If head-major is clearly faster, a head-major layout inside the kernels (or from the model's
# projections) is the next step for #24 item 2.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-300}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
for spec in h100_64k h100_128k h100_1m; do
  if [ $((END - SECONDS)) -ge 60 ]; then
    echo "== t=${SECONDS}s: $spec" | tee -a $L
    timeout 120 python3 $B/bench_attention.py --layout-probe $spec --sweep-reps 10 --out $OUT/layout_probe.jsonl >> $L 2>&1
    echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $spec" | tee -a $L; fi
done
echo "== done t=${SECONDS}s" | tee -a $L
