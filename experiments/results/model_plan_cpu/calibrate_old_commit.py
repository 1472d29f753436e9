"""Calibration of gpu_plan.py (results R53): the same deviceless compile for an H200, run on an older commit
whose steps were measured on the H200, which predates ``selmerge_jax.kernels.target``. So this scratch
script monkeypatches the platform questions instead, as ``compiling_for`` answers them now.

  git worktree add /tmp/wt <commit> && ln -sfn /tmp/wt/kernels /tmp/wt/selmerge_jax/kernels
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=/tmp/wt \
    python calibrate_old_commit.py /tmp/wt <commit> <bench_model.py arguments> >> calibration.jsonl
"""
import json
import os
import sys

wt, commit, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, f"{wt}/experiments/benchmarks")
_HERE = os.path.dirname(os.path.abspath(__file__))  # experiments/results/model_plan_cpu of this checkout
sys.path.append(os.path.join(_HERE, "..", "..", "benchmarks"))  # its gpu_plan.py: the H200 description

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

jax.default_backend = lambda: "gpu"  # the old dispatch asks this
from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu as _mosaic  # noqa: E402

if hasattr(_mosaic, "_is_hopper"):
    _mosaic._is_hopper = lambda: True
else:
    _mosaic._mgc.is_hopper = lambda: True
import bench_model as bm  # noqa: E402  (the old commit's, first on the path)

assert bm.__file__.startswith(wt), bm.__file__
import types  # noqa: E402

# gpu_plan imports the platform module this old commit lacks; the script answers those questions above.
sys.modules["selmerge_jax.kernels.target"] = types.SimpleNamespace(HOPPER=None, compiling_for=None)
import gpu_plan  # noqa: E402

sharding = gpu_plan.topology_sharding(gpu_plan.TARGETS["h200"])
args = bm.parse_args(argv)
for attention in args.attention:
    cell = bm.Cell(args.presets[0], args.lengths[0], attention, args.mode)
    cfg = bm.model_config(args, cell)
    tx = optax.adamw(1e-4)
    shapes = jax.eval_shape(lambda cfg=cfg, mode=cell.mode, tx=tx: bm.init_train_state(
        bm._make(cfg, mode), tx, trainable=bm._trainable(mode))[1])
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    batch = {"tokens": jax.ShapeDtypeStruct((1, cell.seq_len + 1), jnp.int32, sharding=sharding)}
    step = bm.make_train_step(bm.graphdef_of(cfg, cell.mode), tx, compute_dtype=jnp.bfloat16,
                              loss_chunk=args.loss_chunk)
    compiled = step.lower(state, batch).compile()
    m = compiled.memory_analysis()
    plan = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    print(json.dumps({"bench": "gpu_plan_calibration", "commit": commit, "preset": cell.preset,
                      "seq_len": cell.seq_len, "attention": attention, "remat": cfg.remat,
                      "layers": cfg.num_layers, "plan_gb": round(plan / 2**30, 2), "jax": jax.__version__,
                      **gpu_plan.hlo_counts(compiled.as_text())}), flush=True)
