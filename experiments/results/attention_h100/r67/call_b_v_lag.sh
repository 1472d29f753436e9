#!/bin/bash
# R67 b: one device call (H100) at 9e0a65c: the overlapped forward's GPU tests and tilings (-k), then forward
# sweeps at 64K and 128K: default, overlap with turns, overlap without turns, default, overlap with turns.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:xdist -m gpu -k "overlap or tiling10 or tiling11" tests/test_kernels_mosaic_gpu.py > $OUT/gpu_tests.txt 2>&1; echo "rc=$?" | tee -a $L; tail -n 3 $OUT/gpu_tests.txt | tee -a $L
SWEEP='[{}, {"overlap": true}, {"overlap": true, "pingpong": false}, {}, {"overlap": true}]'
for spec in h100_64k h100_128k; do
  timeout 120 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu --modes fwd --mosaic-sweep "$SWEEP" --mosaic-sweep-mode fwd --sweep-reps 10 --reps 10 --warmup 2 --out $OUT/sweep_${spec#h100_}.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
done
