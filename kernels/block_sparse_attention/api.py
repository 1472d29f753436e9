"""Public block-sparse attention op: one function, several implementations, always a pure-JAX fallback.

``implementation`` is ``None`` (best for ``jax.default_backend()``, then the XLA path), one name, or a sequence
of names tried in order. A backend that cannot handle the inputs raises ``NotImplementedError`` and dispatch
falls through to the next; the pure-JAX ``"xla"`` path supports everything, so a CPU notebook always works.
"""

from collections.abc import Callable, Sequence
from typing import Literal

import jax

from selmerge_jax.kernels.block_sparse_attention.plan import SelectionPlan, check_plan_inputs
from selmerge_jax.kernels.block_sparse_attention.reference import block_sparse_attention_reference

__all__ = ["IMPLEMENTATIONS", "Implementation", "block_sparse_attention", "register_implementation"]

Implementation = Literal["xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu"]

IMPLEMENTATIONS: dict[str, Callable] = {"xla": block_sparse_attention_reference}

_DEFAULT_ORDER = {
    # Mosaic GPU declines anything but Hopper and the H100 spec's family (then Triton takes it): H100 64K
    # forward 4.1 vs 6.5 ms (experiments/results/archive/attention_h100_README.md, run 6).
    "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
    "tpu": ("pallas_mosaic_tpu", "xla"),
    "cpu": ("xla",),
}


def register_implementation(name: str, fn: Callable) -> None:
    """Adds a backend; ``fn(q, k, v, plan, *, scale, return_lse)`` must raise NotImplementedError to decline."""
    IMPLEMENTATIONS[name] = fn


def _load_backends() -> None:
    # Backends register themselves on import; a missing Pallas lowering (old jaxlib, no GPU plugin) only
    # removes that backend, it never breaks the XLA path.
    for module in ("pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu"):
        try:
            __import__(f"selmerge_jax.kernels.block_sparse_attention.{module}")
        except (ImportError, AttributeError):  # AttributeError: Pallas API drift across jax versions
            pass


def _candidates(implementation) -> tuple[str, ...]:
    if implementation is None:
        return _DEFAULT_ORDER.get(jax.default_backend(), ("xla",))
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
        raise ValueError("implementation must be None, a name or a non-empty sequence of names")
    return names


def block_sparse_attention(q, k, v, plan: SelectionPlan, *, scale: float | None = None,
                           return_lse: bool = False,
                           implementation: Implementation | Sequence[Implementation] | None = None):
    """Block-sparse attention of q ``[B, T, N, H]`` over k/v ``[B, T, K, H]`` driven by ``plan``.

    See ``plan.py`` for the semantics and ``reference.py`` for the oracle. Returns ``out`` (and the float32
    log-sum-exp ``[B, T, N]`` when ``return_lse``).
    """
    check_plan_inputs(q, k, v, plan)
    _load_backends()
    names = _candidates(implementation)
    errors = []
    for name in names:
        if name not in IMPLEMENTATIONS:
            if implementation is not None and name not in _DEFAULT_ORDER_NAMES:
                raise ValueError(f"implementation={name!r} is unknown; choose from {sorted(_DEFAULT_ORDER_NAMES)}")
            errors.append(f"{name}: not available on this install")
            continue
        try:
            return IMPLEMENTATIONS[name](q, k, v, plan, scale=scale, return_lse=return_lse)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no implementation supports these inputs: " + "; ".join(errors))


_DEFAULT_ORDER_NAMES = frozenset({"xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu"})
