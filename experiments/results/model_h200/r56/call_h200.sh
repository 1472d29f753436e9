#!/bin/bash
# R56, one device call. On an H200: the 7B LoRA step at 128K with the MLP in 16K-token slices, MS vs dense in
# one invocation (R55 measured it on an H100: 55.32 GiB), and 256K MS with slices (planned at 100.99 GiB).
# On any GPU: one MS layer at 1M tokens (the H100 specs' shape) at this commit, its Mosaic parts timed apart
# (forward, backward preparation, dQ pass, dK/dV pass) beside selection, forward and gradients.
# Each step runs only if the call has the time it needs left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=545
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT SCRIPT ARGS...: one benchmark invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2 script=$3; shift 3
  if left "$need"; then
    echo "== t=${SECONDS}s: $script $*" | tee -a $L
    timeout "$to" python3 $B/$script "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $script $*" | tee -a $L; fi
}
if [ "$MEM" -gt 100000 ]; then
  step 200 200 bench_model.py --presets llama2-7b --lengths 131072 --remat full --mlp-chunk 16384 --reps 3 \
    --dense-reps-long 1 --out $OUT/llama2_7b_128k_slices_h200.jsonl
fi
step 120 150 bench_attention.py --mosaic-parts h100_1m --ms-layer h100_1m --layer-impl default \
  --layer-modes selection fwd grads --reps 6 --out $OUT/layer_1m_parts.jsonl
if [ "$MEM" -gt 100000 ]; then
  step 110 130 bench_model.py --presets llama2-7b --lengths 262144 --remat full --mlp-chunk 16384 --attention ms \
    --reps 2 --out $OUT/llama2_7b_256k_slices_h200.jsonl
fi
echo "== done t=${SECONDS}s" | tee -a $L
