#!/bin/bash
# One device call on an H100 (about 2.5 minutes): the default forward (overlapped, R68)
# beside cuDNN dense at 64K and 128K, forward only, median of 20, in two separate invocations per length
# (64K, 128K, 64K, 128K), to see the spread of #24 item 2's forward ratio on one machine (R68: 1.007x, 1.011x).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-180}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
for run in 1 2; do
  for spec in h100_64k h100_128k; do
    if [ $((END - SECONDS)) -ge 35 ]; then
      echo "== t=${SECONDS}s: run $run $spec" | tee -a $L
      timeout 60 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd \
        --reps 20 --warmup 2 --out $OUT/fwd_repeat.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
    else echo "== skipped (t=${SECONDS}s): run $run $spec" | tee -a $L; fi
  done
done
echo "== done t=${SECONDS}s" | tee -a $L
