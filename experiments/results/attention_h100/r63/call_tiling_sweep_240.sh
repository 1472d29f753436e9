#!/bin/bash
# R63: one device call, run on an H100 at 1fcfbf6 as `END=300 bash experiments/plans/tiling_sweep_240.sh` (182 s).
# MosaicTiling knobs last swept at 232
# registers, again at the 240 default (R60), A/B/A in one process each:
#   1. 64K forward + backward: stages_dkv 3 (faster than the default 4 at 232 in both archived runs:
#      20.01 vs 20.45 ms, run8a; 20.76 vs 21.40 ms, run8b), stages_dkv 5, and the dQ pass's ping-pong (slower at
#      232: 6.62 vs 5.71 ms, run8b);
#   2. the same knobs at 128K;
#   3. 64K forward: a 2-CTA cluster (K/V multicast; at 128K and 232 registers 8.1155 vs 8.1308 ms, run6b).
# Each step runs only if the call has the time it needs left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
sweep() {  # sweep NEED SPEC MODE TILINGS OUT: one --mosaic-sweep, skipped when the call lacks NEED seconds
  local need=$1 spec=$2 mode=$3 tilings=$4 out=$5
  if left "$need"; then
    echo "== t=${SECONDS}s: sweep $spec $mode $tilings" | tee -a $L
    timeout "$need" python3 $B/bench_attention.py --specs "$spec" --impls pallas_mosaic_gpu --mosaic-sweep "$tilings" \
      --mosaic-sweep-mode "$mode" --sweep-reps 10 --modes "$mode" --reps 10 --warmup 2 --out "$out" >> $L 2>&1
    echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): sweep $spec $mode" | tee -a $L; fi
}
BWD='[{}, {"stages_dkv": 3}, {"stages_dkv": 5}, {"pingpong_dq": true}, {}, {"stages_dkv": 3}]'
sweep 120 h100_64k fwdbwd "$BWD" $OUT/bwd_knobs_64k.jsonl
sweep 150 h100_128k fwdbwd "$BWD" $OUT/bwd_knobs_128k.jsonl
sweep 90 h100_64k fwd '[{}, {"cluster": 2}, {}, {"cluster": 2}]' $OUT/fwd_cluster_64k.jsonl
echo "== done t=${SECONDS}s" | tee -a $L
