"""Public block-sparse attention op: one function, several implementations, always a pure-JAX fallback.

``implementation`` is ``None`` (best for ``target.platform()``, then the XLA path), one name, or a
sequence of names tried in order. A backend that cannot handle the inputs raises ``NotImplementedError`` and
dispatch falls through to the next; the pure-JAX ``"xla"`` path supports everything, so a CPU notebook always
works.

The Pallas backends (``pallas_triton``, ``pallas_mosaic_gpu``, ``pallas_mosaic_tpu``) are imported once, when
the package is imported (``__init__`` calls ``_load_backends``: importing them mid-trace changed jit's cache
key). One whose import fails (an old jaxlib without that Pallas lowering) is *unavailable*: the failure is
logged once (a warning naming the backend and the error) and kept, ``unavailable_implementations()`` returns
it, the default order skips it (logged), and naming it explicitly raises ``ImportError`` with the reason: a
broken backend never silently turns into the XLA path.
"""

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax.numpy as jnp

from selmerge_jax.kernels import target
from selmerge_jax.kernels.block_sparse_attention.plan import (
    SelectionPlan,
    check_plan_inputs,
    check_segment_ids,
)
from selmerge_jax.kernels.block_sparse_attention.reference import block_sparse_attention_reference

__all__ = ["IMPLEMENTATIONS", "Implementation", "available_implementations", "block_sparse_attention",
           "register_implementation", "unavailable_implementations"]

logger = logging.getLogger(__name__)

Implementation = Literal["xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu"]

IMPLEMENTATIONS: dict[str, Callable] = {"xla": block_sparse_attention_reference}

# name -> module; each module's ``IMPLEMENTATION`` is ``fn(q, k, v, plan, *, scale, return_lse)``.
_BACKEND_MODULES = {
    "pallas_triton": "selmerge_jax.kernels.block_sparse_attention.pallas_triton",
    "pallas_mosaic_gpu": "selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu",
    "pallas_mosaic_tpu": "selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_tpu",
}
_KNOWN = frozenset({"xla", *_BACKEND_MODULES})

_DEFAULT_ORDER = {
    # Mosaic GPU declines anything but Hopper and the H100 spec's family (then Triton takes it): H100 64K
    # forward 4.1 vs 6.5 ms (experiments/results/archive/attention_h100_README.md, run 6).
    "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
    "tpu": ("pallas_mosaic_tpu", "xla"),
    "cpu": ("xla",),
}

_UNAVAILABLE: dict[str, Exception] = {}  # backend -> the error its import raised
_loaded = False
_logged_choices: set[tuple] = set()


def register_implementation(name: str, fn: Callable) -> None:
    """Adds a backend; ``fn(q, k, v, plan, *, scale, return_lse)`` must raise NotImplementedError to decline.

    A name registered before the Pallas backends load keeps the caller's function. Where v's head dim differs
    from q/k's, ``fn`` gets all three zero-padded to one head dim (``_call``).
    """
    IMPLEMENTATIONS[name] = fn
    _UNAVAILABLE.pop(name, None)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _load_backends() -> None:
    """Imports the Pallas backends once; a failing one is recorded in ``_UNAVAILABLE`` and logged (a
    warning)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, module in _BACKEND_MODULES.items():
        try:
            # optional dependency: each backend needs its Pallas lowering, which an install may lack
            implementation = importlib.import_module(module).IMPLEMENTATION
        except (ImportError, AttributeError) as e:  # AttributeError: Pallas API drift across jax versions
            _UNAVAILABLE[name] = e
            logger.warning("block_sparse_attention: implementation %r is unavailable "
                           "(import of %s failed: %s)",
                           name, module, _reason(e))
            continue
        IMPLEMENTATIONS.setdefault(name, implementation)


def available_implementations() -> tuple[str, ...]:
    """Names that can be requested on this install (whether they accept given inputs is decided per call)."""
    _load_backends()
    return tuple(sorted(IMPLEMENTATIONS))


def unavailable_implementations() -> dict[str, str]:
    """``{name: reason}`` for each built-in backend whose import failed on this install."""
    _load_backends()
    return {name: _reason(error) for name, error in _UNAVAILABLE.items()}


def _candidates(implementation) -> tuple[str, ...]:
    if implementation is None:
        return _DEFAULT_ORDER.get(target.platform(), ("xla",))
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
        raise ValueError("implementation must be None, a name or a non-empty sequence of names")
    for name in names:
        if name in _UNAVAILABLE:
            raise ImportError(f"implementation={name!r} was requested but is unavailable on this install: "
                              f"{_reason(_UNAVAILABLE[name])}") from _UNAVAILABLE[name]
        if name not in IMPLEMENTATIONS and name not in _KNOWN:
            raise ValueError(f"implementation={name!r} is unknown; choose from "
                             f"{sorted(_KNOWN | set(IMPLEMENTATIONS))}")
    return names


def _log_default_choice(chosen: str, skipped: list[str]) -> None:
    key = (target.platform(), chosen, tuple(skipped))
    if key not in _logged_choices:  # once per distinct outcome, not once per traced call
        _logged_choices.add(key)
        logger.info("block_sparse_attention: implementation=None on %r uses %r%s", target.platform(),
                    chosen,
                    f" ({'; '.join(skipped)})" if skipped else "")


def _takes_segments(fn: Callable) -> bool:
    """Whether a backend accepts ``segment_ids`` (a per-token document mask); those that do not decline."""
    try:
        return "segment_ids" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def _call(fn: Callable, q, k, v, plan: SelectionPlan, scale, return_lse: bool, extra: dict):
    """``fn`` on the inputs; a value head dim ``Hv`` other than q/k's ``H`` (MLA-style) is zero-padded, with
    q and k, to the next power of two of ``max(H, Hv)`` for every backend but the reference (which takes it
    as it is), and the output sliced back. Zero columns add nothing to ``q . k`` and give zero output
    columns, so the result (and its gradient) is exact; the price is the padded columns' matmul work and the
    padded copies of q, k, v and the output."""
    h, hv = k.shape[3], v.shape[3]
    if h == hv or fn is block_sparse_attention_reference:
        return fn(q, k, v, plan, scale=scale, return_lse=return_lse, **extra)
    d = 1 << (max(h, hv) - 1).bit_length()  # the Pallas kernels tile power-of-two head dims

    def pad(x):
        return jnp.pad(x, ((0, 0),) * 3 + ((0, d - x.shape[3]),))

    scale = 1.0 / math.sqrt(h) if scale is None else scale  # the default is the unpadded q/k width's
    result = fn(pad(q), pad(k), pad(v), plan, scale=scale, return_lse=return_lse, **extra)
    if return_lse:
        return result[0][..., :hv], result[1]
    return result[..., :hv]


def block_sparse_attention(q, k, v, plan: SelectionPlan, *, scale: float | None = None,
                           return_lse: bool = False,
                           implementation: Implementation | Sequence[Implementation] | None = None,
                           segment_ids=None):
    """Block-sparse attention of q ``[B, T, N, H]`` over k ``[B, T, K, H]`` and v ``[B, T, K, Hv]`` driven by
    ``plan``.

    See ``plan.py`` for the semantics and ``reference.py`` for the oracle. Returns ``out [B, T, N, Hv]``
    (and the float32 log-sum-exp ``[B, T, N]`` when ``return_lse``). Values may be narrower or wider than
    queries and keys (MLA-style head dims, ``Hv != H``): the kernels then see all three zero-padded to one
    power-of-two head dim (``_call``); the default scale stays ``1/sqrt(H)``.

    ``segment_ids`` ``int [B, T]`` (packed documents): a query sees only keys of its own segment; a backend
    whose function has no ``segment_ids`` parameter (the Mosaic ones) declines such a call, so on a GPU the
    default order falls through to ``"pallas_triton"``.

    Raises:
      ImportError: a requested implementation is unavailable on this install (its import failed).
      NotImplementedError: every candidate declined the inputs.
    """
    check_plan_inputs(q, k, v, plan, value_dim=True)
    check_segment_ids(segment_ids, q)
    _load_backends()
    names = _candidates(implementation)
    errors = []
    for name in names:
        if name not in IMPLEMENTATIONS:  # only in the default order: explicit names were checked above
            errors.append(f"{name}: unavailable ({_reason(_UNAVAILABLE[name])})" if name in _UNAVAILABLE
                          else f"{name}: not registered")
            continue
        fn = IMPLEMENTATIONS[name]
        extra = {}
        if segment_ids is not None:
            if not _takes_segments(fn):
                errors.append(f"{name}: no segment_ids (per-token document mask) support")
                continue
            extra = {"segment_ids": segment_ids}
        try:
            result = _call(fn, q, k, v, plan, scale, return_lse, extra)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
            continue
        if implementation is None:
            _log_default_choice(name, errors)
        return result
    raise NotImplementedError("no implementation supports these inputs: " + "; ".join(errors))
