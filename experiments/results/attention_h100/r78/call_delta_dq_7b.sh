#!/bin/bash
# R78, one device call on an H100 (3.7 minutes), run from experiments/plans/ at 85391eb:
#   1. the 1M layer (h100_1m) at the cluster default, forward and gradients, wall clock and device time,
#      A/B ROUNDS times (3 by default): --layer-impl pallas_mosaic_gpu with '{}' (the default tiling) against
#      '{"delta_in_dq": true}' (the dQ pass completes delta = rowsum(dO O) instead of the preparation kernel,
#      ~5.6 ms of the 1M layer in R75); settles whether delta_in_dq should be on by default at long T;
#   2. #22's Llama-2-7B LoRA step at 128K (remat="full", 16K-token MLP slices), MS (median of 3) and dense cuDNN
#      flash (1 after warm-up) in one invocation, now that the Mosaic kernels run in 2-CTA clusters from 128K
#      tokens up (R77; R62 at 9b0 measured 9.798 s / 4.637x without clusters).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
layer() {  # layer NAME TILING: one --ms-layer h100_1m invocation, skipped without 260 s left (the 7B cell's)
  if left 260; then
    echo "== $(date +%T) t=${SECONDS}s: layer $1 $2" | tee -a $L
    timeout 90 python3 $B/bench_attention.py --ms-layer h100_1m --layer-modes fwd grads --reps 6 --device-time \
      --layer-impl pallas_mosaic_gpu --mosaic-tiling "$2" --out $OUT/layer_1m_$1.jsonl >> $L 2>&1
    echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): layer $1" | tee -a $L; fi
}
for i in $(seq ${ROUNDS:-3}); do
  layer default '{}'
  layer delta_in_dq '{"delta_in_dq": true}'
done
if left 200; then
  echo "== $(date +%T) t=${SECONDS}s: llama2-7b 128K" | tee -a $L
  timeout $((END - SECONDS)) python3 $B/bench_model.py --presets llama2-7b --remat full --mlp-chunk 16384 \
    --lengths 131072 --reps 3 --dense-reps-long 1 --out $OUT/llama2_7b_128k_clusters.jsonl >> $L 2>&1
  echo "rc=$?" | tee -a $L
else echo "== skipped (t=${SECONDS}s): llama2-7b 128K" | tee -a $L; fi
echo "== done t=${SECONDS}s" | tee -a $L
