#!/bin/bash
# R67 c: one device call (H100) at 9e0a65c: forward A/B/C at 64K and 128K, default (ping-pong), overlap
# without turns, neither; the fastest then beside cuDNN dense (forward).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
OV='{"overlap": true, "pingpong": false}'; NP='{"pingpong": false}'
SWEEP="[{}, $OV, $NP, {}, $OV, $NP, {}, $OV]"
for spec in h100_64k h100_128k; do
  timeout 150 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd --mosaic-sweep "$SWEEP" --mosaic-sweep-mode fwd --sweep-reps 15 --reps 10 --warmup 2 --out $OUT/ab_${spec#h100_}.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
done
