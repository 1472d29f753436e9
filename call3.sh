export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 90 python experiments/benchmarks/bench_topk.py --out $OUT/topk.jsonl 2>&1 | grep -v "^{" | tail -3
B=experiments/benchmarks/bench_attention.py
timeout 120 python $B --ms-layer h100_16k h100_128k --layer-impl default --layer-modes selection fwd fwdbwd --out $OUT/attn_layer.jsonl 2>&1 | grep -v "^{" | tail -3
timeout 120 python $B --ms-layer h100_1m --layer-impl default --layer-modes selection fwd grads --reps 6 --out $OUT/attn_1m.jsonl 2>&1 | grep -v "^{" | tail -3
I=experiments/benchmarks/bench_inference.py
timeout 150 python $I --lengths 131072 --prefill ms --new 16 --out $OUT/llama3_8b_128k.jsonl 2>&1 | grep -v "^{" | tail -3
python - <<'P'
import json,os,glob
for p in sorted(glob.glob(os.environ["OUT"]+"/*.jsonl")):
    for l in open(p):
        r=json.loads(l); print(os.path.basename(p), {k:v for k,v in r.items() if k not in ("estimate","shape","config","tiling","device","jax","jaxlib","python","platform")})
P
