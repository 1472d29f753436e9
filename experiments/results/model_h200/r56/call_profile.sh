#!/bin/bash
# R56, profile call (any GPU): where the 128K step's device time goes now. The 7B LoRA step at 2 layers,
# 128K tokens, remat="full", the MLP in 16K-token slices, MS, then dense cuDNN flash, each with one traced
# step; every kernel of both traces kept (trace_summary.py --kernels-to).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
for a in ms dense; do
  echo "== t=${SECONDS}s: $a" | tee -a $L
  timeout 200 python3 $B/bench_model.py --presets llama2-7b --lengths 131072 --remat full --mlp-chunk 16384 \
    --attention $a --layers 2 --reps 3 --dense-reps-long 3 --profile /tmp/prof --out $OUT/profile_2l_128k.jsonl >> $L 2>&1
  echo "rc=$?" | tee -a $L
  d=$(ls -d /tmp/prof/*_${a}_full | head -1)
  python3 $B/trace_summary.py "$d" --kernels-to $OUT/kernels_2l_128k_$a.jsonl.gz >> $L 2>&1
done
echo "== done t=${SECONDS}s" | tee -a $L
