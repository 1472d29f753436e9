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
sweep() {  # sweep NAME TIMEOUT "BENCH ARGS" FLAGS...: one bench_model.py process per XLA_FLAGS value
  local name=$1 to=$2 args=$3; shift 3
  for f in "$@"; do
    echo "== XLA_FLAGS='$f'" | tee -a $OUT/log_$name.txt
    XLA_FLAGS="$f" timeout "$to" python3 $B/bench_model.py $args >> $OUT/log_$name.txt 2>&1
    echo "rc=$?" | tee -a $OUT/log_$name.txt
  done
}
X=--xla_gpu_exhaustive_tiling_search=true
S="--presets llama2-7b --lengths 32768 --attention ms --reps 5"
sweep l32_save 125 "$S --remat save --out $OUT/l32_32k_flags.jsonl" "" $X
sweep l32_full 110 "$S --remat full --out $OUT/l32_32k_full_flags.jsonl" "" $X
sweep l2_abab 40 "$S --layers 2 --remat save --out $OUT/l2_32k_save_abab.jsonl" "" $X "" $X
