#!/bin/bash
# R81, one device call on an H100 (1.6 minutes; run from experiments/plans/ at 2f0a992), at the new
# selection (R80):
#   1. the 1M layer at the library default, forward and gradients, 10 calls each by wall clock and 10 on the
#      device (--reps 20; R80 had 3 each, too few to tell the host's share from the power-capped clocks'
#      spread), one more traced call per mode with every kernel kept (kernels_1m/);
#   2. selection's share inside one jitted forward (fresh inputs every repetition, #24's measure) at 16K, 64K
#      and 128K (median of 20) and 1M (median of 6).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-300}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
run() {  # run NEED TIMEOUT ARGS...: one bench_attention.py invocation, skipped without NEED seconds left
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== $(date +%T) t=${SECONDS}s: $*" | tee -a $L
    timeout "$to" python3 $B/bench_attention.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
run 100 110 --ms-layer h100_1m --layer-impl default --layer-modes fwd grads --reps 20 --device-time \
  --kernels-to $OUT/kernels_1m --out $OUT/layer_1m_reps10.jsonl
run 60 60 --ms-layer h100_16k h100_64k h100_128k --layer-impl default --layer-modes inside --reps 20 \
  --out $OUT/selection_inside.jsonl
run 50 60 --ms-layer h100_1m --layer-impl default --layer-modes inside --reps 6 --out $OUT/selection_inside.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
