#!/bin/bash
# R61, the three calls that followed call_xla_gemm_flags.sh on the same warm H100, each with R60's patch applied
# (240 registers for each compute warpgroup, the default from R60's commit on). Outputs under $OUT; the logs
# were renamed here log_l32_save.txt, log_l32_full.txt and log_l2_abab.txt.
#   1. 32 layers at 32K, remat="save" (R50's H200 policy), default flags and exhaustive tiling search: both
#      refused by the memory planner before compiling on the H100 (l32_32k_flags.jsonl);
#   2. the same at remat="full" (l32_32k_full_flags.jsonl);
#   3. 2 layers at 32K, remat="save", default / exhaustive / default / exhaustive (l2_32k_save_abab.jsonl), to
#      tell call_xla_gemm_flags.sh's 3% for the exhaustive search from run-to-run spread.
set -u
export JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache PYTHONUNBUFFERED=1
git apply experiments/results/attention_h100/r60/regs240_default.patch 2>/dev/null  # a no-op from R60's commit on
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks
for f in "" "--xla_gpu_exhaustive_tiling_search=true"; do
  echo "== XLA_FLAGS='$f'" | tee -a $OUT/log_l32_save.txt
  XLA_FLAGS="$f" timeout 125 python3 $B/bench_model.py --presets llama2-7b --lengths 32768 --remat save \
    --attention ms --reps 5 --out $OUT/l32_32k_flags.jsonl >> $OUT/log_l32_save.txt 2>&1
  echo "rc=$?" | tee -a $OUT/log_l32_save.txt
done
for f in "" "--xla_gpu_exhaustive_tiling_search=true"; do
  echo "== XLA_FLAGS='$f'" | tee -a $OUT/log_l32_full.txt
  XLA_FLAGS="$f" timeout 110 python3 $B/bench_model.py --presets llama2-7b --lengths 32768 --remat full \
    --attention ms --reps 5 --out $OUT/l32_32k_full_flags.jsonl >> $OUT/log_l32_full.txt 2>&1
  echo "rc=$?" | tee -a $OUT/log_l32_full.txt
done
for f in "" "--xla_gpu_exhaustive_tiling_search=true" "" "--xla_gpu_exhaustive_tiling_search=true"; do
  echo "== XLA_FLAGS='$f'" | tee -a $OUT/log_l2_abab.txt
  XLA_FLAGS="$f" timeout 40 python3 $B/bench_model.py --presets llama2-7b --layers 2 --lengths 32768 \
    --remat save --attention ms --reps 5 --out $OUT/l2_32k_save_abab.jsonl >> $OUT/log_l2_abab.txt 2>&1
  echo "rc=$?" | tee -a $OUT/log_l2_abab.txt
done
