"""The platform a program is built for: the default backend, or a device compiled for ahead of time.

Kernel dispatch asks which platform it is tracing for (Mosaic GPU on a Hopper, Triton on other GPUs, Mosaic on
a TPU, XLA elsewhere). Asking ``jax.default_backend()`` answers for the machine the Python process runs on,
which is wrong when a program is lowered for a device that is not attached: a step compiled on a CPU-only
machine for an H200 topology (``jax.experimental.topologies``, the ``cuda`` plugin's deviceless compile) would
pick the CPU's fallbacks. Every platform question of the kernels and the model goes through this module, and
``compiling_for`` overrides the answers while such a program is traced.
"""

import contextlib
import contextvars
import dataclasses
import re
from typing import Literal

import jax

__all__ = ["HOPPER", "Target", "compiling_for", "compute_capability", "core_count", "is_hopper", "platform"]

Platform = Literal["cpu", "gpu", "tpu"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A device a program is compiled for.

    Attributes:
      platform: as ``jax.default_backend()`` names it ("gpu" for CUDA and ROCm).
      compute_capability: a CUDA GPU's, as its ``Device`` reports it ("9.0"); None elsewhere.
      core_count: streaming multiprocessors (GPU) or cores; the persistent kernels launch one CTA per SM.
    """

    platform: Platform
    compute_capability: str | None = None
    core_count: int | None = None

    def __post_init__(self):
        if self.platform not in ("cpu", "gpu", "tpu"):
            raise ValueError(f"Target.platform={self.platform!r}; allowed: 'cpu', 'gpu', 'tpu'")
        if self.compute_capability is not None and not re.fullmatch(r"\d+\.\d+", self.compute_capability):
            raise ValueError(f"Target.compute_capability={self.compute_capability!r}; expected 'major.minor' "
                             "such as '9.0', or None")
        if self.core_count is not None and (type(self.core_count) is not int or self.core_count < 1):
            raise ValueError(f"Target.core_count={self.core_count!r}; must be a positive int or None")


# H100 and H200 (SXM): compute capability 9.0, 132 SMs.
HOPPER = Target("gpu", compute_capability="9.0", core_count=132)

# A JAX config state, not a plain context variable: states made with include_in_trace_context key jit's trace
# cache, so a function traced for the attached device and traced again (or lowered) inside compiling_for is
# traced anew; with a context variable the second trace would be the cached first one. It holds the target
# encoded as "platform|compute capability|core count", per thread. jax._src is private: where this JAX lacks
# the hook, a context variable stands in and traces cached before compiling_for may be reused (documented).
_NAME = "selmerge_jax_compile_target"


def _make_state():
    try:
        from jax._src import config as jax_config  # optional: private, may change; guarded below

        existing = getattr(jax_config, "config_states", {}).get(_NAME)
        if existing is not None:  # the module executed again (importlib.reload, autoreload)
            return existing
        return jax_config.optional_string_state(
            name=_NAME, default=None, include_in_trace_context=True,
            help="The device selmerge_jax kernels trace for (selmerge_jax.kernels.target.compiling_for).")
    except (ImportError, AttributeError, TypeError):
        return None


_STATE = _make_state()
_FALLBACK: contextvars.ContextVar[str | None] = contextvars.ContextVar(_NAME, default=None)


def _encode(t: Target) -> str:
    return f"{t.platform}|{t.compute_capability or ''}|{t.core_count or ''}"


def _current() -> Target | None:
    value = _STATE.value if _STATE is not None else _FALLBACK.get()
    if value is None:
        return None
    parts = value.split("|")
    if len(parts) != 3 or not (parts[2] == "" or parts[2].isdigit()):
        raise ValueError(f"{_NAME}={value!r}: expected 'platform|compute capability|core count' "
                         "(set it with selmerge_jax.kernels.target.compiling_for)")
    platform_, capability, cores = parts
    return Target(platform_, compute_capability=capability or None,  # type: ignore[arg-type]
                  core_count=int(cores) if cores else None)


@contextlib.contextmanager
def compiling_for(target: Target):
    """Within the block, kernel dispatch and the model trace for ``target`` instead of the attached device.

    Only tracing and lowering read it: jit the function inside the block, or lower it there
    (``jit(f).lower(...)``); calling a function compiled before the block runs what was compiled then."""
    if not isinstance(target, Target):
        raise TypeError(f"compiling_for(target=...) takes a Target, got {type(target).__name__}")
    if _STATE is not None:
        with _STATE(_encode(target)):
            yield target
        return
    token = _FALLBACK.set(_encode(target))
    try:
        yield target
    finally:
        _FALLBACK.reset(token)


def platform() -> str:
    """The platform being traced for: the ``compiling_for`` target's, else ``jax.default_backend()``."""
    chosen = _current()
    return chosen.platform if chosen is not None else jax.default_backend()


def compute_capability() -> str | None:
    """The target GPU's compute capability ("9.0"), None if it is not a CUDA GPU."""
    chosen = _current()
    if chosen is not None:
        return chosen.compute_capability
    dev = jax.local_devices()[0]
    capability = getattr(dev, "compute_capability", None) if dev.platform == "gpu" else None
    return None if capability is None else str(capability)


def is_hopper() -> bool:
    """Whether the target is an sm_90 GPU (H100 / H200), which the Mosaic GPU kernels need."""
    return platform() == "gpu" and (compute_capability() or "").startswith("9.")


def core_count(default: int) -> int:
    """The target's SM (or core) count; ``default`` where the device does not report one."""
    chosen = _current()
    if chosen is not None:
        return chosen.core_count or default
    return int(getattr(jax.local_devices()[0], "core_count", default))
