export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/runs/jaxcache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 100 python probe_topk.py > $OUT/probe_topk.jsonl 2>&1; cat $OUT/probe_topk.jsonl | grep "^{"
B=experiments/benchmarks/bench_inference.py
timeout 420 python $B --lengths 1048576 --prefill ms+budget --budget 131072 --new 16 --out $OUT/llama3_8b_1m_eighth.jsonl 2>&1 | grep -v "^{" | tail -4
python -c "
import json,sys
for l in open('$OUT/llama3_8b_1m_eighth.jsonl'):
    r=json.loads(l); print({k:v for k,v in r.items() if k not in ('estimate',)})
"
