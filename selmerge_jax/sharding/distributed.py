"""One job over several processes (hosts of a GPU cluster, workers of a TPU slice, or local CPU processes):
``jax.distributed`` set up before anything else touches JAX, and the checks that turn a misconfigured job into
an error at start instead of a hang.

* :func:`initialize` reads the coordinator address, process count and process id from ``MeshConfig`` flags
  (``--set mesh.process_id=1``), then ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``,
  then JAX's own SLURM/Open MPI/TPU-VM detection. It must run before any other JAX call (JAX refuses to
  initialize after a backend exists), so every entry point calls it first, through :func:`entry_point`.
* A process that cannot reach the coordinator fails after ``initialization_timeout_s`` naming the address; a
  process that dies later is noticed by the others within ``heartbeat_timeout_s`` (they then stop, non-zero).
* :func:`check_same_config` all-gathers every process's resolved config and refuses to start when one differs
  (which keys), rather than letting mismatched shapes deadlock the first collective.
* :func:`allgather_json`: small host values (e.g. data-iterator positions) from every process.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from selmerge_jax.config_io import to_dict
from selmerge_jax.sharding.mesh import MeshConfig
from selmerge_jax.validation import fail

__all__ = ["ENV_ADDRESS", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "allgather_json", "barrier",
           "check_same_config", "entry_point", "initialize", "is_primary", "resolve"]

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # JAX reads this one itself too
ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Per-process settings: the only config entries allowed to differ between the processes of one job.
PER_PROCESS_KEYS = ("mesh.process_id",)
_log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        fail(name, value, "an int (environment variable)")


def _cluster_detected() -> bool:
    """SLURM with several tasks, Open MPI with several ranks, or a TPU VM that lists several workers."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return (len(hosts) > 1 or (_env_int("SLURM_NTASKS") or 1) > 1
            or (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1)


def resolve(config: MeshConfig) -> tuple[str | None, int | None, int | None]:
    """``(coordinator_address, num_processes, process_id)``: flags first, then the plain environment
    variables; None where neither says (JAX's cluster detection may still fill it)."""
    address = config.coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = config.num_processes if config.num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = config.process_id if config.process_id is not None else _env_int(ENV_PROCESS_ID)
    return address, count, pid


def _wanted(config: MeshConfig, count: int | None) -> bool:
    if config.distributed == "off":
        return False
    if config.distributed == "on":
        return True
    return (count or 1) > 1 or (count is None and _cluster_detected())


def initialize(config: MeshConfig | None = None) -> bool:
    """Joins the multi-process job ``config`` (or the environment) describes; True when one is running.

    Idempotent. Must come before any other JAX call of the process: a JAX backend that already exists cannot
    join a job, which is an error here rather than a job that silently runs as N independent copies.
    """
    config = MeshConfig() if config is None else config
    if jax.distributed.is_initialized():
        return True
    address, count, pid = resolve(config)
    if not _wanted(config, count):
        return False
    if count is not None and pid is not None and not 0 <= pid < count:
        fail("process_id", pid, f"an int in [0, {count - 1}] (num_processes={count})")
    if count is not None and count > 1 and address is None and not _cluster_detected():
        raise ValueError(f"num_processes={count} but no coordinator: set mesh.coordinator_address or "
                         f"{ENV_ADDRESS} to process 0's 'host:port'")
    timeout = config.initialization_timeout_s
    # JAX's client ends the process from C++ (no Python exception) when the coordinator never answers, so a
    # worker first waits for the coordinator's port itself and fails with a message naming the address.
    print(f"jax.distributed: process {pid} of {count} joining the job at {address} (initialization_timeout_s="
          f"{timeout})", file=sys.stderr, flush=True)
    if address is not None and pid not in (None, 0):
        _wait_for(address, timeout, pid, count)
    try:
        jax.distributed.initialize(address, count, pid, initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=config.heartbeat_timeout_s,
                                   shutdown_timeout_seconds=config.shutdown_timeout_s)
    except RuntimeError as error:
        if "before" in str(error) and "initialize" in str(error):
            raise RuntimeError("jax.distributed.initialize() must run before any other JAX call, and this "
                               "process already used JAX: call selmerge_jax.sharding.distributed."
                               "initialize() first thing at the entry point") from error
        raise
    _log.info("jax.distributed: process %d of %d (coordinator %s)", jax.process_index(), jax.process_count(),
              address)
    return True


def is_primary() -> bool:
    """True on process 0 of a multi-process job and in a single-process run: the one that writes the logs,
    metrics and summary (asked without starting a backend when no job was joined)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process of the job waits here until all arrive (nothing to do in a single-process run)."""
    if jax.distributed.is_initialized():
        multihost_utils.sync_global_devices(name)


def _encode(x):
    if isinstance(x, bytes):  # grain iterator states may hold bytes
        return {"__bytes_b64__": base64.b64encode(x).decode("ascii")}
    raise TypeError(f"allgather_json: {type(x).__name__} is not JSON-serializable")


def _decode(d: dict):
    return base64.b64decode(d["__bytes_b64__"]) if set(d) == {"__bytes_b64__"} else d


def _wait_for(address: str, timeout: float, pid: int | None, count: int | None) -> None:
    """Returns once a TCP connection to ``address`` succeeds; ``TimeoutError`` naming it after ``timeout``
    seconds of refused or unanswered attempts."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"process {pid} of {count} could not reach the JAX coordinator at "
                                   f"{address} within initialization_timeout_s={timeout} ({error}): is "
                                   "process 0 running and is that address reachable from here?") from None
            time.sleep(0.5)


def allgather_json(value: Any) -> list:
    """``value`` (JSON-able, bytes allowed) from every process, in process order; ``[value]`` in a
    single-process run. A collective: every process must call it."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value, sort_keys=True, default=_encode).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode("utf-8"), object_hook=_decode)
            for row, n in zip(gathered, lengths, strict=True)]


def _flatten(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, Mapping) and tree:
        out: dict = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_same_config(config: Any) -> None:
    """Refuses to start a job whose processes resolved different configs (a dataclass or a plain dict); only
    :data:`PER_PROCESS_KEYS` may differ. Every process raises, naming the keys, so none waits for the
    others."""
    if jax.process_count() == 1:
        return
    plain = _flatten(to_dict(config) if dataclasses.is_dataclass(config) else dict(config))
    plain = {k: v for k, v in plain.items() if k not in PER_PROCESS_KEYS}
    everyone = allgather_json(plain)
    for index, other in enumerate(everyone):
        changed = sorted(k for k in set(other) | set(everyone[0]) if other.get(k) != everyone[0].get(k))
        if changed:
            raise ValueError(f"process {index}'s config differs from process 0's in {', '.join(changed)}: "
                             "every process of a job must run the same config (only "
                             f"{', '.join(PER_PROCESS_KEYS)} may differ)")


def entry_point(main: F) -> F:
    """Decorates ``main(config, ...)`` of an application: joins the multi-process job (``config.mesh``, or the
    environment when the config has no mesh section) before anything else uses JAX, checks that every process
    runs the same config, and, in a multi-process job, turns an exception into an immediate exit (status 1,
    traceback printed) so the other processes learn of it by heartbeat instead of waiting at exit for a
    process that will never reach the next collective."""
    @functools.wraps(main)
    def wrapped(config, *args, **kwargs):
        initialize(getattr(config, "mesh", None))
        if not is_primary():  # logging is written once: the other processes report only what goes wrong
            logging.getLogger("selmerge_jax").setLevel(logging.WARNING)
        try:
            check_same_config(config)
            return main(config, *args, **kwargs)
        except (Exception, KeyboardInterrupt):
            if jax.process_count() == 1:
                raise
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    return wrapped  # type: ignore[return-value]
