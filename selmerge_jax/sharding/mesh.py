"""A device mesh from config: ``("data", "fsdp", "seq")`` axes; the multi-process settings it carries are
used by ``sharding.distributed`` (which calls ``jax.distributed.initialize()``).

* ``data``: pure data parallelism (params replicated);
* ``fsdp``: batch sharded *and* every large parameter (and its optimizer moments) sharded along one dimension;
* ``seq``: the sequence axis, reserved for ring attention over KV (``selmerge_jax.sharding.ring``); batches
  are sharded along T on it.

Batches are sharded over ``("data", "fsdp")`` on B, so the global batch must divide by ``data * fsdp``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from selmerge_jax.validation import check_choice, check_int, check_non_negative_int, fail, is_int

__all__ = [
    "MESH_AXES",
    "MeshConfig",
    "batch_sharding",
    "data_shard",
    "make_mesh",
    "param_sharding",
    "process_rows",
    "shard_batch",
    "shard_params",
]

MESH_AXES = ("data", "fsdp", "seq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh shape (one axis may be -1: "all remaining devices") and how this process joins a job of several.

    Attributes:
      data, fsdp, seq: axis sizes; their product must equal the device count (of all processes together).
      fsdp_min_size: parameters with fewer elements stay replicated (sharding tiny vectors costs more than it
        saves).
      distributed: "auto" calls ``jax.distributed.initialize()`` only when the flags or the environment say
        this is one process of several (a coordinator address and a process count > 1, SLURM, Open MPI, a
        multi-host TPU VM); "on" always (JAX's own cluster detection fills what is not given); "off" never.
      coordinator_address, num_processes, process_id: the job's coordinator (``host:port`` of process 0),
        its process count and this process's id; None reads ``JAX_COORDINATOR_ADDRESS``,
        ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, then JAX's SLURM/Open MPI/TPU detection. Only
        ``process_id`` may differ between the processes' configs.
      initialization_timeout_s: how long a process waits for the coordinator (and process 0 for the others).
      heartbeat_timeout_s: a process silent this long is dead, and the job's other processes stop (non-zero)
        instead of waiting in a collective forever; JAX's default is 100 s.
      shutdown_timeout_s: how long a finished process waits at exit for the others to finish too.
    """

    data: int = -1
    fsdp: int = 1
    seq: int = 1
    fsdp_min_size: int = 2**18
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 20
    shutdown_timeout_s: int = 120

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "seq": self.seq}
        for name, value in sizes.items():
            if not is_int(value) or (value < 1 and value != -1):
                fail(f"MeshConfig.{name}", value, "a positive int or -1")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {sizes}")
        check_non_negative_int("MeshConfig.fsdp_min_size", self.fsdp_min_size)
        check_choice("MeshConfig.distributed", self.distributed, ("auto", "on", "off"))
        address = self.coordinator_address
        if address is not None and (not isinstance(address, str) or ":" not in address):
            fail("MeshConfig.coordinator_address", address, "None or 'host:port'")
        if self.num_processes is not None:
            check_int("MeshConfig.num_processes", self.num_processes, 1)
        if self.process_id is not None:
            high = None if self.num_processes is None else self.num_processes - 1
            check_int("MeshConfig.process_id", self.process_id, 0, high)
        for name in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
            check_int(f"MeshConfig.{name}", getattr(self, name), 1)

    def shape(self, device_count: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.seq]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise ValueError(f"MeshConfig {sizes}: {device_count} devices do not divide by {known}")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise ValueError(f"MeshConfig data*fsdp*seq = {math.prod(sizes)} != device count {device_count}")
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``MESH_AXES`` over ``devices`` (default: all, in ``jax.make_mesh`` order)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = config.shape(len(devices))
    # Auto axes: XLA propagates shardings through the model (Explicit axes would demand out_sharding= on every
    # gather, e.g. the embedding lookup, which the model code should not have to know about).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh, seq_len: int | None = None) -> NamedSharding:
    """B over ``("data", "fsdp")``, T over ``"seq"`` (unless ``seq_len`` does not divide, e.g. ``T+1``
    tokens)."""
    shard_t = seq_len is None or seq_len % mesh.shape["seq"] == 0
    return NamedSharding(mesh, P(("data", "fsdp"), "seq" if shard_t else None))


def param_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2**18) -> NamedSharding:
    """Shards the largest dimension divisible by the fsdp size over ``"fsdp"``; small or odd arrays
    replicate."""
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < min_size:
        return NamedSharding(mesh, P())
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def shard_params(tree, mesh: Mesh, min_size: int = 2**18):
    """``device_put`` every array leaf with :func:`param_sharding` (scalars and keys replicate)."""
    return jax.tree.map(lambda x: jax.device_put(x, param_sharding(np.shape(x), mesh, min_size)), tree)


def process_rows(mesh: Mesh, batch_size: int, name: str = "batch_size") -> slice:
    """The rows of a global ``[batch_size, ...]`` batch that this process's devices hold (B goes over
    ``("data", "fsdp")``): the process's data shard. Processes that differ only along ``"seq"`` hold the same
    rows (each keeps its own slice of T), so they read the same shard."""
    blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    if not is_int(batch_size) or batch_size < 1 or batch_size % blocks:
        fail(name, batch_size, f"a multiple of the mesh's data*fsdp = {blocks} batch shards (the "
             "global batch, all processes together; nothing is floored)")
    index = NamedSharding(mesh, P(("data", "fsdp"))).addressable_devices_indices_map((batch_size,))
    spans = sorted({s[0].indices(batch_size)[:2] for s in index.values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's devices hold batch rows {spans}, not one contiguous block: order "
                         "the mesh's devices so that each process's devices are adjacent along data/fsdp")
    return slice(start, stop)


def data_shard(mesh: Mesh | None, batch_size: int, name: str = "train.batch_size") -> tuple[int, int]:
    """``(shard_index, shard_count)`` of this process's rows of a global batch: what its data pipeline reads.
    ``(0, 1)`` without a mesh, or when every process holds every row (a sequence axis across processes)."""
    if mesh is None:
        return 0, 1
    rows = process_rows(mesh, batch_size, name)
    size = rows.stop - rows.start
    return rows.start // size, batch_size // size


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch (all T) -> global arrays: ``[B, T]`` leaves on :func:`batch_sharding`.

    Each process passes the rows of :func:`process_rows` (every row when the batch is not split over
    processes) and keeps only the T slices its devices hold, so a sequence axis may cross processes.
    """
    blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    mine = process_rows(mesh, blocks)  # this process's batch shards, in units of one shard
    shards_here = mine.stop - mine.start

    def put(x):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"batch arrays must be [B, T], got shape {x.shape}")
        if x.shape[0] % shards_here:
            fail("batch rows", x.shape[0], f"a multiple of this process's {shards_here} batch shards")
        global_b = x.shape[0] // shards_here * blocks
        offset = process_rows(mesh, global_b).start

        def local(index):  # a device's global (rows, T) index -> the same block of this process's rows
            rows = range(global_b)[index[0]]
            return x[rows.start - offset:rows.stop - offset, index[1]]

        return jax.make_array_from_callback((global_b, x.shape[1]), batch_sharding(mesh, x.shape[1]), local)

    return {k: put(v) for k, v in batch.items()}
