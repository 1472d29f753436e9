"""What every block-sparse attention backend shares (the op's anatomy: ``api`` / ``reference`` / one file per
backend / this file).

Only pure JAX lives here (no Pallas lowering module is imported), so a backend whose Pallas lowering is
missing never takes another backend down with it: constants of the base-2 online softmax, the ``out_shape``
helper that keeps ``shard_map``'s varying axes, a float32-accumulating 2-D matmul, the declines every backend
applies before lowering, and the backward's per-row terms computed from the forward's residuals.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from selmerge_jax.kernels import target

__all__ = ["F32", "LN2", "LOG2E", "NEG_BIG", "backward_row_terms", "decline_dtype", "decline_platform", "dot",
           "out_struct"]

F32 = jnp.float32
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Finite stand-in for -inf as the running max: exp(-inf - NEG_BIG) = 0 and exp(NEG_BIG - NEG_BIG) = 1, so a
# row whose blocks are all masked never produces inf - inf = NaN.
NEG_BIG = -1e30


# Names of a forward kernel's residuals. A model under jax.checkpoint with a policy that saves these names
# (selmerge_jax.models.config, remat="save") keeps them instead of running the forward kernel again in the
# backward: the custom VJP's forward calls the primal, which hides the kernel's own primitive from a policy.
RESIDUAL_NAMES = ("attn_kernel_out", "attn_kernel_lse")


def named_residuals(out, lse):
    """``(out, lse)`` tagged with ``RESIDUAL_NAMES`` (identity outside a remat policy that reads them).

    Behind an optimization barrier: in a layer scan that saves them, each is written into its stacked
    ``[L, ...]`` buffer by a dynamic-update-slice, and XLA's GPU dynamic-slice fusion then gave that write
    its own copy of the kernel's custom call, so the forward kernel ran twice per layer (H200, 7B LoRA step
    at 32K: 1.8-2.2 ms more per layer; results R50). The barrier leaves the write nothing to fuse with.
    """
    out, lse = jax.lax.optimization_barrier((out, lse))
    return checkpoint_name(out, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])


def decline_platform(backend: str, platform: str, interpret: bool) -> None:
    """``NotImplementedError`` (dispatch then falls through) unless on ``platform`` or interpreting."""
    if not interpret and target.platform() != platform:
        raise NotImplementedError(f"{backend} needs a {platform.upper()} backend, tracing for "
                                  f"{target.platform()!r}")


def decline_dtype(backend: str, dtype, supported: tuple) -> None:
    """``NotImplementedError`` naming the dtype and the supported ones."""
    if dtype not in supported:
        names = ", ".join(jnp.dtype(d).name for d in supported)
        raise NotImplementedError(f"{backend}: dtype {dtype} (supported: {names})")


def dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """2-D matmul with float32 accumulation (what ``pl.dot`` did before it was removed in jax 0.11)."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)


def out_struct(shape, dtype, like):
    """An out_shape that varies over the same manual mesh axes as ``like``: inside ``shard_map`` (check_vma)
    a kernel result must say which axes it varies over, or tracing fails (ring attention calls us there)."""
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    if mat is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def backward_row_terms(do, out, lse, dlse, *, base2: bool):
    """``(delta, lse)`` of each query row ``[B, T, N]`` for the backward passes.

    ``delta = rowsum(dO * out) - dlse``: d lse_i / d s_ij = p_ij, so an LSE cotangent only shifts the row
    term, ``ds = p * (dp - (delta - dlse))``. The LSE comes back in base 2 when ``base2`` (kernels using
    ``exp2``), and ``+inf`` where it is not finite (a query that attends to nothing), so
    ``p = exp(s - lse) = 0`` there, never NaN.
    """
    delta = jnp.sum(do.astype(F32) * out.astype(F32), axis=-1) - dlse
    return delta, finite_lse(lse, base2=base2)


def finite_lse(lse, *, base2: bool):
    """The LSE for the backward: in base 2 when ``base2``, ``+inf`` where it is not finite (a query that
    attends to nothing), so that ``p = exp(s - lse) = 0`` there."""
    return jnp.where(jnp.isfinite(lse), lse * LOG2E if base2 else lse, jnp.inf)
