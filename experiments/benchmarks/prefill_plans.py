"""XLA's planned bytes of a one-pass prefill (Llama-3-8B shape) at 2 and 4 layers, compiled, never run.

One JSON line per (layers, variant) with ``generate.prefill_memory``'s parts in GiB and the memory planner's
estimate beside it; the growth from 2 to 4 layers is what each further layer holds. With ``XLA_FLAGS=
--xla_dump_to=DIR``, ``peak_buffers.py DIR --module prefill`` then names the buffers at the peak.

  python experiments/benchmarks/prefill_plans.py OUT.jsonl 524288
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench_inference as bi
from flax import nnx

from selmerge_jax.models import Llama
from selmerge_jax.models.generate import prefill_memory

out = sys.argv[1]
T = int(sys.argv[2])
for layers in (2, 4):
    for variant in ("ms", "ms+budget"):
        args = bi.parse_args(["--layers", str(layers)])
        cfg = bi.model_config(args, "ms", T)
        comp = bi.compression(args) if variant == "ms+budget" else None
        model = nnx.eval_shape(lambda cfg=cfg: Llama(cfg, rngs=nnx.Rngs(0)))
        t0 = time.perf_counter()
        m = prefill_memory(model, batch=1, prompt_len=T, prefill_attention="model", compression=comp,
                           capacity=bi._slots(T, 16, 128) if comp is None else None)
        est = bi.memory.inference_memory(cfg, batch=1, prompt_len=T, new_tokens=16, compression=comp,
                                         prefill="model")
        row = {"layers": layers, "variant": variant, "T": T, "compile_s": round(time.perf_counter() - t0, 1),
               **{k: round(v / 2**30, 3) for k, v in m.items()}, "estimate_gib": round(est.total / 2**30, 2),
               "estimate": est.describe()}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
