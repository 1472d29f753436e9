#!/bin/bash
# R57, one device call (any GPU; written for the H100 80GB the session had): the Llama-3-8B shape (GQA 32/8,
# 128K vocabulary) LoRA r16 step, 32 layers, remat="full", the MLP in 16K-token slices, MS and dense cuDNN
# flash side by side in each invocation: 128K (and 256K, which the memory planner refuses on an 80 GB GPU,
# with its estimate), then 16K, 32K and 64K. Each step runs only if the call has the time it needs left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=575
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT ARGS...: one bench_model.py invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== t=${SECONDS}s: $*" | tee -a $L
    timeout "$to" python3 $B/bench_model.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
C="--presets llama3-8b --remat full --mlp-chunk 16384"
step 250 260 $C --lengths 131072,262144 --reps 3 --dense-reps-long 1 --out $OUT/llama3_8b_128k_256k.jsonl
step 200 230 $C --lengths 16384,32768,65536 --reps 3 --dense-reps-long 1 --out $OUT/llama3_8b_16k_64k.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
