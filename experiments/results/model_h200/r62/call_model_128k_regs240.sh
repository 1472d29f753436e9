#!/bin/bash
# R62: one device call on an H100 (3.7 minutes), run from experiments/plans/ at 3073769 as
# `bash experiments/plans/model_128k_regs240.sh` (there, on a GPU over 100 GB, it ran h200_cells.sh instead;
# the H100 took the branch below it). #22's 128K cells again at the 240-register default (R60), which
# made the Mosaic kernels 3-7% faster on an H100 (R59, R60): about 48 ms of each layer's 310 ms at 128K is
# Mosaic attention (R56), so the step should gain about 1%; this measures it rather than assuming it.
#   1. Llama-2-7B LoRA at 128K, remat="full", 16K-token MLP slices, MS (median of 3) and dense cuDNN flash
#      (1 after warm-up) in one invocation (R55 on an H100 at 232 registers: 9.857 s, 4.66x);
#   2. Llama-3-8B LoRA at 128K, the same, MS (R57: 10.3711 s, 4.493x against dense measured there).
# Each step runs only if the call has the time it needs left.
set -u
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
[ "$MEM" -gt 100000 ] && exec bash "$(dirname "$0")/h200_cells.sh"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT ARGS...: one bench_model.py invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== t=${SECONDS}s: $*" | tee -a $L
    timeout "$to" python3 $B/bench_model.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
C="--remat full --mlp-chunk 16384 --lengths 131072"
step 200 200 --presets llama2-7b $C --reps 3 --dense-reps-long 1 --out $OUT/llama2_7b_128k_regs240.jsonl
step 80 90 --presets llama3-8b $C --attention ms --reps 2 --out $OUT/llama3_8b_128k_regs240.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
