#!/bin/bash
# R55, first device call: the 128K step with the MLP in 16K-token slices (peak against XLA's 56.9 GB plan, MS vs
# dense); q/k/v and gate/up as one matmul each (ModelConfig.fuse_projections) against unfused, at 2 layers and
# at 32 layers (32K, remat="save", MS); 256K MS with slices (plan 100.99 GB); Llama-3-8B at 128K; two
# copy-related XLA flags at 2 layers. Each step runs only if the call has the time it needs left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=565
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
step() {  # step NEED TIMEOUT ARGS...: one bench_model.py invocation, skipped when the call lacks NEED seconds
  local need=$1 to=$2; shift 2
  if left "$need"; then
    echo "== t=${SECONDS}s XLA_FLAGS='${XLA_FLAGS:-}': $*" | tee -a $L
    timeout "$to" python3 $B/bench_model.py "$@" >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $*" | tee -a $L; fi
}
step 200 200 --presets llama2-7b --lengths 131072 --remat full --mlp-chunk 16384 --reps 3 --dense-reps-long 1 \
  --out $OUT/llama2_7b_128k_slices.jsonl
S32="--presets llama2-7b --lengths 32768 --remat save --attention ms"
for f in "" --fuse-projections; do
  step 55 60 $S32 --layers 2 --reps 5 $f --profile /tmp/prof$f --out $OUT/fuse_2l_32k.jsonl
done
for f in "" --fuse-projections; do step 60 70 $S32 --reps 5 $f --out $OUT/fuse_32l_32k.jsonl; done
step 110 120 --presets llama2-7b --lengths 262144 --remat full --mlp-chunk 16384 --attention ms --reps 2 \
  --out $OUT/llama2_7b_256k_slices.jsonl
step 70 75 --presets llama3-8b --lengths 131072 --remat full --mlp-chunk 16384 --attention ms --reps 2 \
  --out $OUT/llama3_8b_128k_slices.jsonl
for f in "--xla_gpu_enable_dynamic_slice_fusion=false" "--xla_gpu_copy_insertion_use_region_analysis=true"; do
  XLA_FLAGS="$f" step 40 40 $S32 --layers 2 --reps 5 --out $OUT/flags_2l_32k.jsonl
done
echo "== done t=${SECONDS}s" | tee -a $L
