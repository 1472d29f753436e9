#!/bin/bash
# Plan (not yet run): one device call on an H200 (run with needs_h200; about 9 minutes): the #22 cells that
# only an H200 holds, with the MLP in 16K-token slices, remat="full":
#   1. Llama-2-7B LoRA at 128K, MS (median of 3) and dense cuDNN flash (1 after warm-up) in one invocation
#      (measured on an H100 in R55: 9.857 s, 55.32 GiB, 4.66x);
#   2. Llama-2-7B LoRA at 256K, MS (without slices: R24);
#   3. Llama-3-8B LoRA at 256K, MS (XLA plans 98.76 GiB for an H200, R58; refused on an H100, R57).
# Each step runs only if the call has the time it needs left; on a GPU under 100 GB the script stops.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-575}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
[ "$MEM" -gt 100000 ] || { echo "== not an H200 ($MEM MiB): nothing run" | tee -a $L; exit 1; }
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT ARGS...: one bench_model.py invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== t=${SECONDS}s: $*" | tee -a $L
    timeout "$to" python3 $B/bench_model.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
C="--remat full --mlp-chunk 16384"
step 200 200 --presets llama2-7b $C --lengths 131072 --reps 3 --dense-reps-long 1 --out $OUT/llama2_7b_128k_h200.jsonl
step 130 140 --presets llama2-7b $C --lengths 262144 --attention ms --reps 2 --out $OUT/llama2_7b_256k_h200.jsonl
step 130 140 --presets llama3-8b $C --lengths 262144 --attention ms --reps 2 --out $OUT/llama3_8b_256k_h200.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
