#!/bin/bash
# R61: one device call, run on an H100 as `END=320 bash <this file>` (67 s), for #22's 32K step (1.9015 s against 1.7 s).
# R50's 2-layer trace of that step (Llama-2-7B, remat="save", MS) puts about 36 of a layer's 54 ms of kernels
# in matmuls; the backward's dX GEMMs of the MLP run slower than the forward's (4.2 ms against 3.63 ms for the
# same FLOPs on the H200), and XLA's Triton GEMM fusions (gemm_fusion_dot) take 27.5 ms of the 2-layer step.
# Each row here is the 2-layer step (median of 5) under one set of XLA GPU flags, each with one traced step,
# to see whether XLA's GEMM choices leave time on the table: the default, cuBLAS instead of cuBLASLt, no Triton
# GEMM fusions, and the Triton GEMM autotuner's exhaustive search. Each step runs only if the call has the time
# it needs left.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-570}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
C="--presets llama2-7b --layers 2 --lengths 32768 --remat save --attention ms --reps 5"
i=0
for flags in "" "--xla_gpu_enable_cublaslt=false" "--xla_gpu_enable_triton_gemm=false" \
             "--xla_gpu_exhaustive_tiling_search=true"; do
  i=$((i + 1))
  if left 110; then
    echo "== t=${SECONDS}s: XLA_FLAGS='$flags' bench_model.py $C" | tee -a $L
    XLA_FLAGS="$flags" timeout 150 python3 $B/bench_model.py $C --profile /tmp/prof$i \
      --out $OUT/gemm_flags_2l_32k.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
    for d in /tmp/prof$i/*/; do
      python3 $B/trace_summary.py "$d" --kernels-to "$OUT/trace_$i.jsonl.gz" >> $L 2>&1
    done
  else echo "== skipped (t=${SECONDS}s): XLA_FLAGS='$flags'" | tee -a $L; fi
done
echo "== done t=${SECONDS}s" | tee -a $L
