#!/bin/bash
# R79, one device call on an H100 (2.4 minutes; run from experiments/plans/ at d688029): selection's two
# changes at 1M tokens, against the former selection, each patched in or out in the benchmark's own process:
#   - the top-k's tile filter at the width picked by length (selection._tile_width: the power of two nearest
#     sqrt(R / k); 16 at 1M, 8 at 128K) instead of a fixed 128 columns;
#   - causal bands (selection._causal_bands, _BANDS = 4): each band of chunks scores only the regions before
#     its end, instead of every chunk scoring all R regions.
#   1. bench_topk.py: every top-k variant per shape, tile widths 8-128 among them, median of 10;
#   2. the 1M layer (h100_1m), forward and gradients, wall clock and device time, and selection alone
#      (kind: selection_share), ROUNDS rounds (2 by default) of: the library default; 8 bands; the former
#      selection (one band, tiles of 128).
# The layer rows use bench_attention.py's default --layer-impl, pallas_triton (R79 ran so); with
# IMPL=default (the library's default, the Mosaic kernels on an H100) and TOPK=0 (no step 1) it is R80.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-400}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
if [ "${TOPK:-1}" = 1 ]; then
  echo "== $(date +%T) t=${SECONDS}s: bench_topk" | tee -a $L
  timeout 120 python3 $B/bench_topk.py --reps 10 --out $OUT/topk_tiles.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
fi
layer() {  # layer NAME PATCH: one --ms-layer h100_1m invocation with PATCH run first, skipped without 45 s left
  if left 45; then
    echo "== $(date +%T) t=${SECONDS}s: layer $1: $2" | tee -a $L
    timeout 80 python3 -c "import sys; sys.path.insert(0, '$B'); from selmerge_jax.attention import selection
$2
import bench_attention; bench_attention.main(sys.argv[1:])" --ms-layer h100_1m --layer-modes fwd grads --reps 6 \
      --layer-impl ${IMPL:-pallas_triton} --device-time --out $OUT/layer_1m_$1.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): layer $1" | tee -a $L; fi
}
for i in $(seq ${ROUNDS:-2}); do
  layer default "pass"
  [ "${BANDS8:-1}" = 1 ] && layer bands8 "selection._BANDS = 8"
  layer former "selection._BANDS = 1; selection._tile_width = lambda columns, k: 128"
done
echo "== done t=${SECONDS}s" | tee -a $L
