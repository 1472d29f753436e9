#!/bin/bash
# R55, second device call (H200): the 128K step with the MLP in 16K-token slices, MS vs dense in one invocation
# (the H100 call measured it at 55.32 GiB), then 256K MS with slices (planned at 100.99 GiB).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=420
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT ARGS...: one bench_model.py invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== t=${SECONDS}s: $*" | tee -a $L
    timeout "$to" python3 $B/bench_model.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
step 200 200 --presets llama2-7b --lengths 131072 --remat full --mlp-chunk 16384 --reps 3 --dense-reps-long 1 \
  --out $OUT/llama2_7b_128k_slices_h200.jsonl
step 110 130 --presets llama2-7b --lengths 262144 --remat full --mlp-chunk 16384 --attention ms --reps 2 \
  --out $OUT/llama2_7b_256k_slices_h200.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
