export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B=experiments/benchmarks/bench_attention.py
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 env JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_selective_decode_kernel.py tests/test_plan_everywhere.py -p no:cacheprovider 2>&1 | tail -4
timeout 330 python $B --specs h100_64k h100_128k --impls pallas_mosaic_gpu cudnn_dense --peer-flex --reps 10 --warmup 2 --ms-layer h100_16k h100_128k --layer-impl default --layer-modes selection fwd fwdbwd --out $OUT/attn.jsonl 2>&1 | grep -v "^{" | tail -5
timeout 150 python $B --ms-layer h100_1m --layer-impl default --layer-modes selection fwd grads --reps 6 --out $OUT/attn_1m.jsonl 2>&1 | grep -v "^{" | tail -5
python - <<'P'
import json,os
for f in ("attn.jsonl","attn_1m.jsonl"):
    p=os.path.join(os.environ["OUT"],f)
    if not os.path.exists(p): continue
    for l in open(p):
        r=json.loads(l); print({k:r.get(k) for k in ("kind","spec","impl","mode","ms","tflops_useful","selection_share","selection_ms","op_fwd_ms","tflops_vs_cudnn_dense","tflops_vs_flex_attention","process_peak_bytes","error") if r.get(k) is not None})
P
