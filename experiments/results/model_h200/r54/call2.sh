#!/bin/bash
# R54, second device call: the 7B LoRA step at 128K under remat="full" with the MLP in 16K-token slices
# (MS and dense in one invocation; R53 planned 56.9 GB), 256K MS (planned 100.99 GB), the 8B MS cell,
# then two more XLA flags for the 32K copies at 2 layers (most important first: device time is short).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log2.txt
timeout 260 python3 $B/bench_model.py --presets llama2-7b --lengths 131072 --remat full --mlp-chunk 16384 \
  --reps 5 --dense-reps-long 1 --out $OUT/llama2_7b_128k_slices.jsonl >> $L 2>&1
timeout 120 python3 $B/bench_model.py --presets llama2-7b --lengths 262144 --remat full --mlp-chunk 16384 \
  --attention ms --reps 2 --out $OUT/llama2_7b_256k_slices.jsonl >> $L 2>&1
timeout 70 python3 $B/bench_model.py --presets llama3-8b --lengths 131072 --remat full --mlp-chunk 16384 \
  --attention ms --reps 2 --out $OUT/llama3_8b_128k_slices.jsonl >> $L 2>&1
# the deviceless compile: without dynamic-slice fusion 10.84 GB and 19 copies, with region analysis in copy
# insertion 10.0 GB and 17 copies, against 11.01 GB and 20 (2 layers)
for F in "" "--xla_gpu_enable_dynamic_slice_fusion=false" "--xla_gpu_copy_insertion_use_region_analysis=true"; do
  XLA_FLAGS="$F" timeout 40 python3 $B/bench_model.py --presets llama2-7b --layers 2 --lengths 32768 --remat save \
    --attention ms --reps 5 --out $OUT/flags2_2l_32k.jsonl >> $L 2>&1
done
echo "== done" | tee -a $L
