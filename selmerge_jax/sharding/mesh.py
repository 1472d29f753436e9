"""A device mesh from config: ``("data", "fsdp", "seq")`` axes, plus guarded multi-host initialization.

* ``data``: pure data parallelism (params replicated);
* ``fsdp``: batch sharded *and* every large parameter (and its optimizer moments) sharded along one dimension;
* ``seq``: the sequence axis, reserved for ring attention over KV (``selmerge_jax.sharding.ring``); batches
  are sharded along T on it.

Batches are sharded over ``("data", "fsdp")`` on B, so the global batch must divide by ``data * fsdp``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from selmerge_jax.validation import check_choice, check_non_negative_int, fail, is_int

__all__ = [
    "MESH_AXES",
    "MeshConfig",
    "batch_sharding",
    "initialize_distributed",
    "make_mesh",
    "param_sharding",
    "shard_batch",
    "shard_params",
]

MESH_AXES = ("data", "fsdp", "seq")
_log = logging.getLogger(__name__)
# Environment variables that mean "this process is one of several": a coordinator, SLURM/MPI launchers, or
# a multi-host TPU slice (TPU VMs list every worker's hostname).
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh shape; one axis may be -1 ("all remaining devices").

    Attributes:
      data, fsdp, seq: axis sizes; their product must equal the device count.
      fsdp_min_size: parameters with fewer elements stay replicated (sharding tiny vectors costs more than it
      saves). distributed: "auto" calls ``jax.distributed.initialize()`` only when the environment says this
      is one
        process of several; "on" always; "off" never.
    """

    data: int = -1
    fsdp: int = 1
    seq: int = 1
    fsdp_min_size: int = 2**18
    distributed: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "seq": self.seq}
        for name, value in sizes.items():
            if not is_int(value) or (value < 1 and value != -1):
                fail(f"MeshConfig.{name}", value, "a positive int or -1")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {sizes}")
        check_non_negative_int("MeshConfig.fsdp_min_size", self.fsdp_min_size)
        check_choice("MeshConfig.distributed", self.distributed, ("auto", "on", "off"))

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


def _looks_multihost() -> bool:
    if any(os.environ.get(name) for name in _MULTIHOST_ENV):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE",
                                                                              "1")) > 1


def initialize_distributed(config: MeshConfig) -> bool:
    """Calls ``jax.distributed.initialize()`` when configured/needed; must run before any other JAX call."""
    if config.distributed == "off" or (config.distributed == "auto" and not _looks_multihost()):
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize()
    _log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


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


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (this process's rows) -> global arrays: ``[B, T]`` leaves on :func:`batch_sharding`."""
    def put(x):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"batch arrays must be [B, T], got shape {x.shape}")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.shape[1]), x)

    return {k: put(v) for k, v in batch.items()}
