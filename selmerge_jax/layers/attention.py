"""The one attention front door: ``attend(q, k, v, positions, spec, position_fn=...) -> out``.

Both the model (``models/llama.py``) and the stand-alone ``MSAttention`` layer call :func:`attend`, so the
choice of dense vs select-and-merge, which flash kernel runs dense attention, and where RoPE applies
(``MSAttentionConfig.position_mode``) are decided in one place. Combinations that cannot work raise a
``ValueError`` naming the option; nothing is silently ignored.

Dense attention kernels (``AttentionSpec.dense_kernel``):

* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``; builds the ``T x S`` score matrix (fine
  on CPU and at short T; out of memory at 16K+ on a GPU for a 7B model).
* ``"cudnn"``: cuDNN flash attention (GPU, bf16/fp16 activations); the real dense baseline at long T.
* ``"auto"``: cuDNN on a GPU with half-precision activations, XLA otherwise.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.attention.ms import ms_attention
from selmerge_jax.attention.selected_positions import ms_attention_selected_positions
from selmerge_jax.kernels import target
from selmerge_jax.positional import RotaryPositions
from selmerge_jax.sharding.ring_ms import sequence_parallel_attention
from selmerge_jax.validation import check_choice

__all__ = ["ATTENTION_KINDS", "DENSE_KERNELS", "AttentionSpec", "attend", "attended_fraction",
           "attended_keys",
           "dense_self_attention", "describe", "resolve_dense_kernel"]


AttentionKind = Literal["dense", "ms", "ring", "ring_ms"]
DenseKernel = Literal["auto", "xla", "cudnn"]
ATTENTION_KINDS = ("dense", "ms", "ring", "ring_ms")
DENSE_KERNELS = ("auto", "xla", "cudnn")
_MS_BACKENDS = {"reference": "xla", "pallas": None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """What :func:`attend` computes; hashable, so it can be a static argument.

    Attributes:
      kind: ``"dense"``, ``"ms"`` (select-and-merge), or the sequence-parallel ``"ring"`` / ``"ring_ms"``.
      ms: the select-and-merge configuration (kinds ``ms`` and ``ring_ms``).
      ms_kernel: ``"reference"`` (pure-JAX block-sparse op) or ``"pallas"`` (best Pallas kernel).
      dense_kernel: ``"auto"``, ``"xla"`` or ``"cudnn"`` (see the module docstring).
      causal: causal masking; only dense attention may be non-causal (MS follows ``ms.causal``).
      window: Mistral's sliding window (a query sees itself and the ``window - 1`` keys before it); dense
      only. sequence_axis: the mesh axis that ring kinds shard the sequence over.
    """

    kind: AttentionKind = "dense"
    ms: MSAttentionConfig = dataclasses.field(default_factory=MSAttentionConfig)
    ms_kernel: Literal["reference", "pallas"] = "reference"
    dense_kernel: DenseKernel = "auto"
    causal: bool = True
    window: int | None = None
    sequence_axis: str = "seq"

    def __post_init__(self):
        check_choice("AttentionSpec.kind", self.kind, ATTENTION_KINDS)
        check_choice("AttentionSpec.ms_kernel", self.ms_kernel, _MS_BACKENDS)
        check_choice("AttentionSpec.dense_kernel", self.dense_kernel, DENSE_KERNELS)
        if self.window is not None and self.kind != "dense":
            raise ValueError(f"sliding_window={self.window} works with attention='dense' only, got "
                             f"attention={self.kind!r}; set sliding_window=None")
        if self.kind in ("ring", "ring_ms") and not self.causal:
            raise ValueError(f"attention={self.kind!r} is causal only, got causal=False")
        if self.kind == "ring_ms" and self.ms.position_mode != "before_selection":
            raise ValueError(f"MSAttentionConfig.position_mode={self.ms.position_mode!r} is not supported by "
                             "attention='ring_ms'; allowed there: 'before_selection'")

    @property
    def is_ms(self) -> bool:
        return self.kind in ("ms", "ring_ms")


def resolve_dense_kernel(kernel: str, dtype) -> Literal["xla", "cudnn"]:
    """The concrete dense kernel for ``kernel`` and activation ``dtype`` on the platform traced for
    (``kernels.target.platform()``)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    gpu = target.platform() == "gpu"
    if kernel == "auto":
        return "cudnn" if gpu and half else "xla"
    if kernel == "cudnn" and not (gpu and half):
        raise ValueError(f"dense_kernel='cudnn' needs a GPU and bfloat16/float16 activations, got backend "
                         f"{target.platform()!r} and dtype {jnp.dtype(dtype).name}; use 'auto' or 'xla'")
    return kernel


def dense_self_attention(q, k, v, *, causal: bool = True, window: int | None = None, segment_ids=None,
                         kernel: str = "auto"):
    """Attention of q ``[B, T, N, H]`` over k/v ``[B, S, K, H]`` (GQA) with optional window and segments.

    Masks are by index, so packed sequences pass ``segment_ids`` ``int [B, T]``.
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
    local = None if window is None else (window - 1, 0)
    impl = resolve_dense_kernel(kernel, q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, local_window_size=local,
                                        implementation=impl)


def attend(q, k, v, positions, spec: AttentionSpec, *, position_fn: Callable | None = None, segment_ids=None):
    """Self-attention of q ``[B, T, N, H]`` over k/v ``[B, T, K, H]`` as ``spec`` says.

    Args:
      positions: ``int [B, T]`` or ``RotaryPositions``; read only by ``position_fn``.
      position_fn: ``fn(q, k, positions) -> (q, k)`` (RoPE and its rules, ``selmerge_jax.positional``);
        ``position_mode="selected_compact"`` also needs its ``rotate(x, positions)`` method. None: no
        positions.
      segment_ids: ``int [B, T]`` packed-document ids: dense, or select-and-merge (``kind="ms"``) with
        ``position_mode`` ``"before_selection"``/``"selected_original"`` (``ms_attention``'s semantics: a
        document starting at a multiple of ``block_size * merge``, positions restarting there, gets the output
        it gets alone). The Pallas kernels take no segment mask, so ``ms_kernel="pallas"`` runs the
        ``"xla"`` block-sparse op for such a call (logged). Ring kinds refuse it.

    Returns ``[B, T, N, H]``.
    """
    mode = spec.ms.position_mode if spec.is_ms and position_fn is not None else "before_selection"
    if segment_ids is not None and spec.kind in ("ring", "ring_ms"):
        raise ValueError(f"segment_ids (packed sequences) work with attention='dense' or 'ms', got "
                         f"attention={spec.kind!r}; turn document masking off or use one of those")
    if segment_ids is not None and mode == "selected_compact":
        raise ValueError("segment_ids (packed sequences) do not work with MSAttentionConfig.position_mode="
                         "'selected_compact'; allowed with segment_ids: 'before_selection', "
                         "'selected_original'")
    if mode == "selected_compact":
        return _selected_compact(q, k, v, positions, spec, position_fn)
    sel_q, sel_k = q, k
    if position_fn is not None:
        q, k = position_fn(q, k, positions)
    # what remat="save" keeps for the backward (with the kernels' outputs), so no projection is recomputed
    q, k, v = (checkpoint_name(x, name) for x, name in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v")))
    if spec.kind == "dense":
        return dense_self_attention(q, k, v, causal=spec.causal, window=spec.window, segment_ids=segment_ids,
                                    kernel=spec.dense_kernel)
    if spec.kind in ("ring", "ring_ms"):
        ms = spec.ms if spec.kind == "ring_ms" else None
        impl = _MS_BACKENDS[spec.ms_kernel] if ms is not None else None
        return sequence_parallel_attention(q, k, v, axis_name=spec.sequence_axis, ms_config=ms,
                                           implementation=impl)
    selection = dict(selection_q=sel_q, selection_k=sel_k) if mode == "selected_original" else {}
    return ms_attention(q, k, v, spec.ms, implementation=_MS_BACKENDS[spec.ms_kernel],
                        segment_ids=segment_ids, **selection)


def _selected_compact(q, k, v, positions, spec: AttentionSpec, fn):
    if not callable(getattr(fn, "rotate", None)):
        raise TypeError("position_mode='selected_compact' needs a position_fn with a rotate(x, positions) "
                        "method (selmerge_jax.positional.RopeFn / CRDNTKFn)")
    logn = getattr(getattr(fn, "config", None), "logn_length", None)
    if logn is not None:
        raise ValueError(f"RopeConfig.logn_length={logn} scales the queries in the "
                         "position hook's (q, k) call, "
                         "which position_mode='selected_compact' does not make; use before_selection or "
                         "selected_original")
    rotate = fn.rotate
    if isinstance(positions, RotaryPositions):  # keep the step's traced frequencies (CRD NTK)
        def rotate(x, p):
            return fn.rotate(x, RotaryPositions(p, positions.inv_freq))
    return ms_attention_selected_positions(q, k, v, spec.ms, rotate, scheme="compact")


def attended_keys(ms: MSAttentionConfig, seq_len: int) -> np.ndarray:
    """Keys each query position ``[seq_len]`` attends exactly: its selected regions, its causal part of the
    group's local regions, and one centroid per unselected candidate region when ``ms.centroids``."""
    i = np.arange(seq_len)
    w = ms.block_size
    group_start = (i // w) // ms.merge * ms.merge  # gs, first region of the query's group
    candidates = group_start  # regions strictly before the group
    selected = np.minimum(candidates, ms.num_selected)
    keys = selected * w + (i - group_start * w + 1)
    if ms.centroids:
        keys = keys + (candidates - selected)
    return keys


def attended_fraction(ms: MSAttentionConfig | None, seq_len: int) -> float:
    """Attended keys over causal dense keys, summed over a sequence of ``seq_len`` (1.0 for ``ms=None``)."""
    if ms is None:
        return 1.0
    return float(attended_keys(ms, seq_len).sum() / (seq_len * (seq_len + 1) / 2))


@functools.cache
def describe(spec: AttentionSpec, seq_len: int) -> str:
    """One line for a run's log: the attention in use and, for MS, the attended fraction at ``seq_len``.

    The caller prints it (the training loop, once per job): an MS configuration whose ``top_k`` regions cover
    every region is dense attention at a higher cost, and says so.
    """
    if not spec.is_ms:
        line = f"attention={spec.kind} (dense kernel {spec.dense_kernel}) at T={seq_len}"
    else:
        frac = attended_fraction(spec.ms, seq_len)
        regions = -(-seq_len // spec.ms.block_size)
        line = (f"attention={spec.kind} (kernel {spec.ms_kernel}, {spec.ms.top_k} of {regions} regions of "
                f"{spec.ms.block_size} tokens) at T={seq_len}: attended fraction {frac:.3f}")
        if spec.ms.top_k >= regions:
            line += " -- top_k covers every region, so this is dense attention computed the MS way"
    return line
