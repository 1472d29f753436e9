#!/bin/bash
# R63, second call (the same warm H100, 43 s with the compilation cache): the 1M layer's Mosaic parts at the
# default stages_dkv (4) and at 3, in one process each, then the layer's gradients (8 repetitions asked;
# the layer rows other than selection run half as many: 4).
export JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache PYTHONUNBUFFERED=1
B=experiments/benchmarks/bench_attention.py; L=$OUT/log.txt
for T in '{}' '{"stages_dkv": 3}'; do
  echo "== t=${SECONDS}s parts $T" | tee -a $L
  timeout 110 python3 $B --mosaic-parts h100_1m --mosaic-tiling "$T" --reps 6 --out $OUT/parts_1m_dkv_stages.jsonl >> $L 2>&1
  echo rc=$? | tee -a $L
done
echo "== t=${SECONDS}s grads" | tee -a $L
timeout 120 python3 $B --ms-layer h100_1m --layer-impl default --layer-modes grads --reps 8 \
  --out $OUT/layer_1m_grads_reps8.jsonl >> $L 2>&1
echo rc=$? | tee -a $L
