#!/bin/bash
# R75, one device call on an H100 (about 4 minutes): where the 1M layer's gradients spend the ~17 ms that the
# Mosaic passes and selection, timed apart, do not account for (R67: 333.9 ms against 317.2 ms of parts).
#   1. the layer (library default order) at 1M: forward and gradients, wall clock and device time, one more
#      traced call of each with every kernel kept (--kernels-to);
#   2. the 1M Mosaic forward with a 2- and 4-CTA cluster multicasting each K/V block (R63 measured no gain at
#      64K and 128K, where K/V mostly stays in L2; at 1M it is 4 GiB), A/B/C twice in one process;
#   3. step 1 with the Mosaic kernels and MosaicTiling(delta_in_dq=True) (the dQ pass computes delta).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-540}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
layer() {  # layer NAME ARGS...: one --ms-layer h100_1m invocation, skipped without 150 s left
  local name=$1; shift
  if left 150; then
    echo "== t=${SECONDS}s: $name $*" | tee -a $L
    timeout 240 python3 $B/bench_attention.py --ms-layer h100_1m --layer-modes fwd grads --reps 6 --device-time \
      --kernels-to $OUT/kernels_$name "$@" --out $OUT/layer_1m_$name.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $name" | tee -a $L; fi
}
layer default --layer-impl default
if left 100; then
  echo "== t=${SECONDS}s: cluster sweep h100_1m" | tee -a $L
  C='[{}, {"cluster": 2}, {"cluster": 4}, {}, {"cluster": 2}, {"cluster": 4}]'
  timeout 200 python3 $B/bench_attention.py --specs h100_1m --impls pallas_mosaic_gpu --modes fwd \
    --mosaic-sweep "$C" --mosaic-sweep-mode fwd --sweep-reps 5 --reps 5 --warmup 1 \
    --out $OUT/cluster_1m.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
else echo "== skipped (t=${SECONDS}s): cluster sweep" | tee -a $L; fi
layer delta_in_dq --layer-impl pallas_mosaic_gpu --mosaic-tiling '{"delta_in_dq": true}'
echo "== done t=${SECONDS}s" | tee -a $L
