"""A multi-process JAX job on this machine: ``N`` processes on the CPU backend, each with ``D`` forced host
devices, joined through one coordinator, exactly as the hosts of a GPU cluster or TPU slice would be.

    python -m selmerge_jax.main.launch_local --processes 2 --devices-per-process 2 -- \\
        python experiments/pretrain.py --config experiments/configs/pretrain.yaml --set mesh.seq=4

Every process gets ``JAX_COORDINATOR_ADDRESS`` (a free local port), ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, ``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count=D`` in
``XLA_FLAGS``, which is what ``sharding.distributed.initialize`` reads; the command after ``--`` runs
unchanged. Output lines are forwarded with a ``[pI]`` prefix. When a process exits non-zero the others are
killed and the launcher exits with that status; it exits 0 only when every process did.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from selmerge_jax.validation import check_int, check_number, fail

__all__ = ["LaunchConfig", "cli", "free_port", "main", "process_env"]

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """Attributes:
      command: the program every process runs (argv list), unchanged.
      processes: how many processes (JAX "hosts").
      devices_per_process: forced CPU devices of each.
      port: the coordinator's port on 127.0.0.1; None picks a free one.
      timeout_s: kill the whole job after this long (None: no limit).
      kill_others: when a process exits non-zero, kill the others at once (default). False waits for each
        to end by itself: how a test sees the job's own heartbeat stop the survivors.
    """

    command: tuple[str, ...]
    processes: int = 2
    devices_per_process: int = 1
    port: int | None = None
    timeout_s: float | None = None
    kill_others: bool = True

    def __post_init__(self):
        if not self.command or not all(isinstance(c, str) for c in self.command):
            fail("LaunchConfig.command", self.command, "a non-empty list of strings (the program after --)")
        check_int("LaunchConfig.processes", self.processes, 1, 256)
        check_int("LaunchConfig.devices_per_process", self.devices_per_process, 1, 1024)
        if self.port is not None:
            check_int("LaunchConfig.port", self.port, 1, 65535)
        if self.timeout_s is not None:
            check_number("LaunchConfig.timeout_s", self.timeout_s, 0, low_open=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, address: str, processes: int, process_id: int, devices: int) -> dict:
    """``base`` plus what makes a process one of the job (any device-count flag in XLA_FLAGS is replaced)."""
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    return {**base, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join([*flags, f"{_DEVICE_FLAG}={devices}"]),
            "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(process_id), "PYTHONUNBUFFERED": "1"}


def _forward(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode("utf-8", "replace"))
        out.flush()


def _kill(procs: Sequence[subprocess.Popen]) -> None:
    """Ends every still-running process of the job with its whole process group (a console script may have
    started children)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def main(config: LaunchConfig, out=None, env: dict | None = None) -> int:
    """Runs the job (``out``: where the prefixed lines go, default stdout; ``env``: the processes' base
    environment, default this one's); returns 0 if every process exited 0, else the first non-zero status
    (128 + N for signal N)."""
    out = sys.stdout if out is None else out
    env = dict(os.environ if env is None else env)
    address = f"127.0.0.1:{config.port or free_port()}"
    procs, threads = [], []
    for i in range(config.processes):
        own = process_env(env, address=address, processes=config.processes, process_id=i,
                          devices=config.devices_per_process)
        p = subprocess.Popen(list(config.command), env=own, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        threads.append(threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", out), daemon=True))
        threads[-1].start()
    start = time.monotonic()
    deadline = None if config.timeout_s is None else start + config.timeout_s
    status, reported = 0, set()
    try:
        while len(reported) < len(procs):
            for i, p in enumerate(procs):
                if i not in reported and p.poll() is not None:
                    reported.add(i)
                    out.write(f"[launch_local] p{i} exited with status {p.returncode} after "
                              f"{time.monotonic() - start:.1f} s\n")
                    out.flush()
                    if p.returncode != 0 and config.kill_others and not status:
                        status = p.returncode
            if status:
                break
            if deadline is not None and time.monotonic() > deadline:
                out.write(f"[launch_local] timeout_s={config.timeout_s} passed: killing the job\n")
                status = 124
                break
            time.sleep(0.05)
    finally:
        _kill(procs)
        for t in threads:
            t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    if status < 0:  # ended by a signal: the shell's convention
        status = 128 - status
    if status:
        codes = ", ".join(f"p{i}={p.returncode}" for i, p in enumerate(procs))
        out.write(f"[launch_local] job failed (exit codes {codes})\n")
        out.flush()
    return status


def cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m selmerge_jax.main.launch_local --processes N --devices-per-process D -- "
              "COMMAND [ARGS...]", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m selmerge_jax.main.launch_local",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
    args = parser.parse_args(argv[:split])
    try:
        config = LaunchConfig(command=tuple(argv[split + 1:]), processes=args.processes,
                              devices_per_process=args.devices_per_process, port=args.port,
                              timeout_s=args.timeout)
    except ValueError as e:
        print(f"launch_local: {e}", file=sys.stderr)
        return 2
    return main(config)


if __name__ == "__main__":
    sys.exit(cli())
