#!/bin/bash
# R55, second device call (run only if the first showed fused projections faster): the 32-layer 32K cell with
# q/k/v and gate/up fused, HF + PEFT (child process), MS and dense in one invocation, as R54 ran it unfused.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
timeout 400 python3 $B/bench_model.py --presets llama2-7b --lengths 32768 --remat save --fuse-projections \
  --peer-hf --out $OUT/llama2_7b_save_32k_fused.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
echo "== done t=${SECONDS}s" | tee -a $L
