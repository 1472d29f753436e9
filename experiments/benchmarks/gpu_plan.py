"""Compile ``bench_model.py``'s training step for an H100/H200 on a machine without one: XLA's memory plan.

The CUDA PJRT plugin compiles without a device when given a target description (a ``GpuTargetConfigProto``;
``jax.experimental.topologies``). The step is lowered for that topology inside
``selmerge_jax.kernels.target.compiling_for`` (so MS attention dispatches to the Mosaic GPU kernels as on the
H200) and compiled by the same XLA GPU pipeline; nothing runs. Per cell one JSON line: XLA's planned bytes
(arguments + outputs + temporaries - aliased, what ``bench_model.py`` reports as ``plan_gb``), the memory
planner's estimate beside it, what the optimized module holds (cuBLAS and Mosaic GPU calls, copies), compile
seconds on this machine.

How far to trust it. On the H200 ``bench_model.py``'s ``plan_gb`` equalled the measured ``peak_gb_process``
in every cell (results R22, R23, R50). Compiled here, without autotuning: XLA emits its untuned Triton GEMM
fusions, which absorb elementwise neighbours the device's autotuner gives back to cuBLAS, and plans 2.4 GB
less than with them off at 128K (R53). With Triton GEMMs off (the default here; ``--triton-gemm`` turns them
on) the plan is 0.11-0.62 GB under the device's peak on the commits measured there (66.34 vs 66.63 GB at
128K, 107.47 vs 107.58 GB under "save" at 32K): results R53. The instruction mix is not the device's (the
GEMMs are cuBLAS calls from the start, so XLA's dynamic-slice fusion can take some); counts are for
orientation, times are not estimated at all.

Needs the CUDA plugin of the installed jax (and, for dense cells, the cuDNN library), no GPU and no driver:

  JAXV=$(python -c 'import jax; print(jax.__version__)')
  pip install "jax-cuda12-plugin==$JAXV" "jax-cuda12-pjrt==$JAXV" "nvidia-cudnn-cu12>=9.8,<10"
  python experiments/benchmarks/gpu_plan.py --presets llama2-7b --lengths 131072 --remat full \
      --mlp-chunk 16384
"""

import os
import sys


def _environment_before_jax(argv: list[str]) -> None:
    """Compile for the target, never start a local GPU; Triton GEMMs off unless asked for (module docstring).
    Run as a script only: XLA reads its flags once, when the first backend starts."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "--triton-gemm" not in argv:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_gpu_enable_triton_gemm=false").strip()


if __name__ == "__main__":
    _environment_before_jax(sys.argv)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import bench_model as bm  # noqa: E402  (beside this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from selmerge_jax.kernels.target import Target, compiling_for  # noqa: E402
from selmerge_jax.models.memory import train_memory  # noqa: E402

# Hopper SXM parts as the CUDA runtime describes them (public specifications). XLA reads the compute
# capability, SM count, shared memory and L2 for fusion and tiling.
_HOPPER_INFO = """
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  l2_cache_size: 52428800 clock_rate_ghz: 1.98 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
"""
TARGETS = {
    "h200": (f"gpu_device_info {{ {_HOPPER_INFO} memory_bandwidth: 4800000000000 "
             "device_memory_size: 150754820096 }\n"
             'platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 } '
             'device_description_str: "NVIDIA H200"'),
    "h100": (f"gpu_device_info {{ {_HOPPER_INFO} memory_bandwidth: 3352320000000 "
             "device_memory_size: 84942979072 }\n"
             'platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 } '
             'device_description_str: "NVIDIA H100 80GB HBM3"'),
}
_CAPACITY = {"h200": 150754820096, "h100": 84942979072}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="h200", help=f"one of {sorted(TARGETS)} or a GpuTargetConfigProto "
                   "text file (the compute capability must be 9.x: the Mosaic GPU kernels need a Hopper)")
    p.add_argument("--triton-gemm", action="store_true", help="leave XLA's Triton GEMM fusions on (untuned)")
    p.add_argument("--dump", default=None, metavar="DIR", help="write each cell's optimized HLO text here")
    known, rest = p.parse_known_args(argv)
    args = bm.parse_args(rest)  # --presets, --lengths, --attention, --remat, --mlp-chunk, --layers, --out...
    for name, value in vars(known).items():
        setattr(args, name, value)
    return args


def target_of(config_text: str) -> Target:
    """The ``kernels.target.Target`` a description names: its compute capability and SM count. Refused unless
    a Hopper (9.x): the MS step is planned with the Mosaic GPU kernels, which need one."""
    major = re.search(r"cuda_compute_capability\s*\{[^}]*major:\s*(\d+)", config_text)
    minor = re.search(r"cuda_compute_capability\s*\{[^}]*minor:\s*(\d+)", config_text)
    cores = re.search(r"core_count:\s*(\d+)", config_text)
    if major is None or major.group(1) != "9" or cores is None:
        found = "none" if major is None else f"{major.group(1)}.{minor.group(1) if minor else 0}"
        raise ValueError(f"--target: compute capability {found}, core_count "
                         f"{cores.group(1) if cores else 'missing'}; allowed: a 9.x GPU (H100, H200) with "
                         "its core_count, since the MS step is planned with the Mosaic GPU kernels")
    capability = f"9.{minor.group(1) if minor else 0}"
    return Target("gpu", compute_capability=capability, core_count=int(cores.group(1)))


def has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def target_config(name: str) -> str:
    if name in TARGETS:
        return TARGETS[name]
    if not os.path.isfile(name):
        raise ValueError(f"--target={name!r}: neither one of {sorted(TARGETS)} nor a file")
    with open(name) as f:
        return f.read()


def topology_sharding(config_text: str) -> NamedSharding:
    """A one-device mesh of the described GPU, for lowering without it; a clear error without the plugin."""
    from jax.experimental import topologies

    if not has_cuda_plugin():
        raise RuntimeError(
            f"compiling for a GPU without one needs the CUDA plugin of jax {jax.__version__}: pip install "
            f"'jax-cuda12-plugin=={jax.__version__}' 'jax-cuda12-pjrt=={jax.__version__}'")
    topo = topologies.get_topology_desc("gpu_plan", "cuda", target_config=config_text, topology="1x1x1")
    return NamedSharding(topologies.make_mesh(topo, (1,), ("x",)), PartitionSpec())


def hlo_counts(text: str) -> dict:
    """What the optimized module holds: library and kernel calls, copies, loops."""
    targets = re.findall(r'custom_call_target="([^"]+)"', text)
    return {"cublas_calls": sum(t.startswith("__cublas") for t in targets),
            "mosaic_gpu_calls": sum(t.startswith("mosaic_gpu") for t in targets),
            "cudnn_calls": sum(t.startswith("__cudnn") for t in targets),
            "copies": len(re.findall(r"= \S+ copy\(", text)),
            "while_loops": len(re.findall(r" while\(", text))}


def plan_cell(args, cell: bm.Cell, sharding: NamedSharding, gpu: Target) -> dict:
    cfg = bm.model_config(args, cell)
    lora_rank = bm.LORA.rank if cell.mode == "lora" else None
    estimate = train_memory(cfg, batch=1, seq_len=cell.seq_len, lora_rank=lora_rank,
                            loss_chunk=args.loss_chunk)
    row = {"bench": "gpu_plan", **dataclasses.asdict(cell), "target": args.target, "layers": cfg.num_layers,
           "remat": cfg.remat, "mlp_chunk": cfg.mlp_chunk, "fuse_projections": cfg.fuse_projections,
           "loss_chunk": args.loss_chunk,
           "triton_gemm": args.triton_gemm, "estimate_gb": round(estimate.total / 2**30, 2)}
    tx = optax.adamw(1e-4)
    shapes = jax.eval_shape(lambda: bm.build_state(cfg, cell.mode, tx))  # bench_model's state, never made
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    batch = {"tokens": jax.ShapeDtypeStruct((1, cell.seq_len + 1), jnp.int32, sharding=sharding)}
    t0 = time.perf_counter()
    with compiling_for(gpu):
        step = bm.make_train_step(bm.graphdef_of(cfg, cell.mode), tx, compute_dtype=jnp.bfloat16,
                                  loss_chunk=args.loss_chunk)
        compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    plan = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    text = compiled.as_text()
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        name = f"{cell.preset}_{cell.seq_len}_{cell.attention}_{cfg.remat}_{cfg.num_layers}l.hlo.txt"
        with open(os.path.join(args.dump, name), "w") as f:
            f.write(text)
    row.update(status="ok", compile_s_here=round(time.perf_counter() - t0, 1),
               plan_gb=round(plan / 2**30, 2), temp_gb=round(mem.temp_size_in_bytes / 2**30, 2),
               argument_gb=round(mem.argument_size_in_bytes / 2**30, 2),
               fits=bool(plan <= _CAPACITY[args.target]) if args.target in _CAPACITY else None,
               **hlo_counts(text))
    return row


def _commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    config_text = target_config(args.target)
    gpu = target_of(config_text)
    sharding = topology_sharding(config_text)
    env = {"jax": jax.__version__, "compiled_on": "CPU-only host (deviceless compile, nothing run)",
           "xla_flags": os.environ.get("XLA_FLAGS") or None, "commit": _commit()}
    rows = []
    for preset_name in args.presets:
        for seq_len in args.lengths:
            for attention in args.attention:
                cell = bm.Cell(preset_name, seq_len, attention, args.mode)
                try:
                    row = plan_cell(args, cell, sharding, gpu)
                except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. no cuDNN library here
                    row = {"bench": "gpu_plan", **dataclasses.asdict(cell), "target": args.target,
                           "status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
                row.update(env)
                bm.emit(row, args.out)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
