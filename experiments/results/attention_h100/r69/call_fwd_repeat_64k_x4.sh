#!/bin/bash
# R69, second call on the same warm H100 right after call_fwd_repeat.sh: the 64K forward beside cuDNN dense in four
# separate invocations (median of 20 each).
export JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
for r in 1 2 3 4; do
  timeout 40 python3 experiments/benchmarks/bench_attention.py --specs h100_64k --impls pallas_mosaic_gpu cudnn_dense \
    --modes fwd --reps 20 --warmup 2 --out $OUT/fwd_repeat_64k_x4.jsonl > /dev/null 2>&1; echo rc=$?
done
