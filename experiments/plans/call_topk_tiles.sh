#!/bin/bash
# R79, one device call on an H100 (about 3 minutes): the top-k's tile filter at the width selection now picks
# by length (selection._tile_width: the power of two nearest sqrt(R / k); 16 at 1M, 8 at 128K) against the
# former fixed 128 columns (at 128K, 8 tiles of 128 were too few, so plain rounds ran there):
#   1. bench_topk.py: every top-k variant per shape, tile widths 8-128 among them, median of 10;
#   2. the 1M layer (h100_1m), forward and gradients, wall clock and device time, and selection alone
#      (kind: selection_share), A/B ROUNDS times (3 by default): the library default against the same with
#      selection._tile_width patched to 128 (the former rule) in the benchmark's process.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-400}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
echo "== $(date +%T) t=${SECONDS}s: bench_topk" | tee -a $L
timeout 150 python3 $B/bench_topk.py --reps 10 --out $OUT/topk_tiles.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
OLD="import sys; sys.path.insert(0, '$B'); from selmerge_jax.attention import selection
selection._tile_width = lambda columns, k: 128  # the former fixed width
import bench_attention; bench_attention.main(sys.argv[1:])"
layer() {  # layer NAME PYTHON-ARGS...: one --ms-layer h100_1m invocation, skipped without 60 s left
  local name=$1; shift
  if left 60; then
    echo "== $(date +%T) t=${SECONDS}s: layer $name" | tee -a $L
    timeout 90 python3 "$@" --ms-layer h100_1m --layer-modes fwd grads --reps 6 --device-time \
      --out $OUT/layer_1m_$name.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): layer $name" | tee -a $L; fi
}
for i in $(seq ${ROUNDS:-3}); do
  layer tile_default $B/bench_attention.py
  layer tile128 -c "$OLD"
done
echo "== done t=${SECONDS}s" | tee -a $L
