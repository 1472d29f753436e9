#!/bin/bash
# R59, one device call (any GPU): the 1M MS layer's Mosaic passes (forward, backward preparation, dQ, dK/dV)
# timed apart with the default register split (232 + 232 + 40) and with FA3's (240 + 240 + 24), one
# invocation each, on the same machine. Each step runs only if the call has the time it needs left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-140}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
for t in '{}' '{"compute_registers": 240}' '{}'; do
  if left 35; then
    echo "== t=${SECONDS}s: --mosaic-tiling $t" | tee -a $L
    timeout 60 python3 $B/bench_attention.py --mosaic-parts h100_1m --mosaic-tiling "$t" --reps 6 \
      --out $OUT/parts_1m_regs.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): --mosaic-tiling $t" | tee -a $L; fi
done
echo "== done t=${SECONDS}s" | tee -a $L
