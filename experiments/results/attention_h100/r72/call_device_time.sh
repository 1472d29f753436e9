#!/bin/bash
# One device call on an H100 (about 7 minutes): the default kernels beside cuDNN dense, timed by wall clock
# (time_fn: the host's dispatch and wait included) and on the device (bench_attention.py --device-time: the
# kernels' own time per call, from a profiler trace), forward and forward + backward, median of 20 each; each
# row a separate invocation: 64K three times, 128K twice. Do the MS forward's spread between invocations and
# its gap to cuDNN at 64K come from the host's share of a 4 ms call?
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks; L=$OUT/log.txt; END=${END:-540}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a $L
left() { [ $((END - SECONDS)) -ge "$1" ]; }
for spec in h100_64k h100_128k h100_64k h100_128k h100_64k; do
  if left 110; then
    echo "== t=${SECONDS}s: $spec" | tee -a $L
    timeout 150 python3 $B/bench_attention.py --specs $spec --impls pallas_mosaic_gpu cudnn_dense --modes fwd fwdbwd \
      --device-time --reps 20 --warmup 2 --out $OUT/device_time.jsonl >> $L 2>&1; echo "rc=$?" | tee -a $L
  else echo "== skipped (t=${SECONDS}s): $spec" | tee -a $L; fi
done
echo "== done t=${SECONDS}s" | tee -a $L
