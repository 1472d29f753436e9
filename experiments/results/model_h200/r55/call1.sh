#!/bin/bash
# R55, first device call: the 128K step with the MLP in 16K-token slices (peak against XLA's 56.9 GB plan, MS vs
# dense), 256K MS (plan 100.99 GB), Llama-3-8B at 128K, then two copy-related XLA flags on the 2-layer 32K
# `save` step and the 32-layer 32K `save` MS cell at this commit. Each step runs only if the call has time left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=560
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
# left NEED: true when NEED seconds remain before END
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT ARGS...: one bench_model.py invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== t=${SECONDS}s: $*" | tee -a $L
    timeout "$to" python3 $B/bench_model.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
step 240 250 --presets llama2-7b --lengths 131072 --remat full --mlp-chunk 16384 --reps 5 --dense-reps-long 1 \
  --out $OUT/llama2_7b_128k_slices.jsonl
step 110 120 --presets llama2-7b --lengths 262144 --remat full --mlp-chunk 16384 --attention ms --reps 2 \
  --out $OUT/llama2_7b_256k_slices.jsonl
step 70 75 --presets llama3-8b --lengths 131072 --remat full --mlp-chunk 16384 --attention ms --reps 2 \
  --out $OUT/llama3_8b_128k_slices.jsonl
for f in "" "--xla_gpu_enable_dynamic_slice_fusion=false" "--xla_gpu_copy_insertion_use_region_analysis=true"; do
  XLA_FLAGS="$f" step 40 40 --presets llama2-7b --layers 2 --lengths 32768 --remat save --attention ms --reps 5 \
    --out $OUT/flags_2l_32k.jsonl
done
step 50 60 --presets llama2-7b --lengths 32768 --remat save --attention ms --out $OUT/llama2_7b_save_32k_ms.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
