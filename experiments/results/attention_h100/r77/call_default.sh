#!/bin/bash
# R77, one device call on an H100 (about 5 minutes): the length-dependent default (MosaicTiling.cluster and
# cluster_dq None: 2-CTA clusters from 128K tokens up) against the former default (no clusters):
#   0. 128K: the forward A/B/A/B (no clusters, default) in one process, median of 10, then the faster beside
#      cuDNN dense, forward and forward + backward, median of 20, wall clock and device time;
#   1. the 1M layer (library default order), forward and gradients, wall clock and device time, A/B (ROUNDS
#      times, 1 by default)
#      with --layer-impl pallas_mosaic_gpu --mosaic-tiling '{"cluster": 1, "cluster_dq": 1}';
#   2. the 1M Mosaic forward, backward preparation, dQ and dK/dV passes apart at the default.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-240}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
layer() {  # layer NAME ARGS...: one --ms-layer h100_1m invocation, skipped without 50 s left
  local name=$1; shift
  if left 50; then
    echo "== $(date +%T) t=${SECONDS}s: layer $name $*" | tee -a $L
    timeout 80 python3 $B/bench_attention.py --ms-layer h100_1m --layer-modes fwd grads --reps 6 --device-time \
      "$@" --out $OUT/layer_1m_$name.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): layer $name" | tee -a $L; fi
}
NC='{"cluster": 1, "cluster_dq": 1}'
echo "== $(date +%T) t=${SECONDS}s: h100_128k" | tee -a $L
timeout 130 python3 $B/bench_attention.py --specs h100_128k --impls pallas_mosaic_gpu cudnn_dense --modes fwd fwdbwd \
  --mosaic-sweep "[$NC, {}, $NC, {}]" --mosaic-sweep-mode fwd --sweep-reps 10 --reps 20 --warmup 2 \
  --device-time --out $OUT/default_128k.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
for i in $(seq ${ROUNDS:-1}); do
  layer default --layer-impl default
  layer no_clusters --layer-impl pallas_mosaic_gpu --mosaic-tiling "$NC"
done
if left 50; then
  echo "== $(date +%T) t=${SECONDS}s: parts h100_1m" | tee -a $L
  timeout 80 python3 $B/bench_attention.py --mosaic-parts h100_1m --reps 5 --out $OUT/parts_1m_default.jsonl >> $L 2>&1
  echo "rc=$?" | tee -a $L
else echo "== skipped (t=${SECONDS}s): parts" | tee -a $L; fi
echo "== done t=${SECONDS}s" | tee -a $L
