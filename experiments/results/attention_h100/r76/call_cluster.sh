#!/bin/bash
# R76, one device call on an H100 (about 8 minutes): K/V multicast in 2-CTA clusters for the forward
# (MosaicTiling.cluster) and now the dQ pass too (MosaicTiling.cluster_dq), after R75 measured the 1M forward
# 7.5% faster with cluster=2 (61.8 / 61.4 ms against 66.3 / 66.7 ms) and 1.7x slower with cluster=4.
#   1. GPU tests: both clusters' outputs and gradients against the default's (test_native_tilings_agree);
#   2. the 1M layer (selection + the Mosaic kernels; its plan built at run time, so nothing constant-folds),
#      forward and gradients, wall clock and device time: default, clusters, default, clusters, then clusters
#      with delta_in_dq, each its own invocation;
#   3. 64K and 128K: forward + backward A/B/A/B (default, clusters) in one process, median of 10, then the
#      faster beside cuDNN dense, forward and forward + backward, median of 20, by wall clock and device time.
# Throughout, nvidia-smi samples the SM clock, power and temperature every 200 ms (smi.csv; the log's
# markers carry the wall time), to see whether clocks explain the run-to-run spread at 1M (R75: gradients
# 316.7-335.6 ms wall within one invocation).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-560}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 200 > $OUT/smi.csv 2>&1 &
SMI=$!
C='{"cluster": 2, "cluster_dq": 2}'
CD='{"cluster": 2, "cluster_dq": 2, "delta_in_dq": true}'
echo "== $(date +%T) t=${SECONDS}s: pytest -m gpu -k cluster" | tee -a $L
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:xdist -m gpu -k "native_tilings_agree and cluster" \
  tests/test_kernels_mosaic_gpu.py > $OUT/gpu_tests_cluster.txt 2>&1; echo "rc=$?" | tee -a $L
tail -n 3 $OUT/gpu_tests_cluster.txt | tee -a $L
layer() {  # layer NAME TILING: one --ms-layer h100_1m invocation, skipped without 60 s left
  if left 60; then
    echo "== $(date +%T) t=${SECONDS}s: layer $1 $2" | tee -a $L
    timeout 90 python3 $B/bench_attention.py --ms-layer h100_1m --layer-impl pallas_mosaic_gpu --mosaic-tiling "$2" \
      --layer-modes fwd grads --reps 6 --device-time --out $OUT/layer_1m_$1.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): layer $1" | tee -a $L; fi
}
layer default '{}'; layer clusters "$C"; layer default '{}'; layer clusters "$C"; layer clusters_delta "$CD"
for spec in h100_64k h100_128k; do
  if left 110; then
    echo "== $(date +%T) t=${SECONDS}s: $spec" | tee -a $L
    timeout 150 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd fwdbwd \
      --mosaic-sweep "[{}, $C, {}, $C]" --mosaic-sweep-mode fwdbwd --sweep-reps 10 --reps 20 --warmup 2 \
      --device-time --out $OUT/clusters_${spec#h100_}.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $spec" | tee -a $L; fi
done
kill $SMI
echo "== done t=${SECONDS}s" | tee -a $L
