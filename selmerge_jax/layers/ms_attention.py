"""``MSAttention``: a Flax NNX attention layer (q/k/v/o projections, GQA) over the one front door ``attend``.

The module only holds parameters; ``layers.attention.attend`` decides the rest, exactly as it does for the
model's attention (``models/llama.py``). ``implementation`` picks the attention path:

* ``"reference"``: select-and-merge with the pure-JAX block-sparse op (any backend);
* ``"pallas"``: select-and-merge with the best Pallas kernel for the backend, falling back to pure JAX;
* ``"dense"``: plain causal attention (the baseline), ignoring the MS config.

``position_fn(q, k, positions) -> (q, k)`` is an optional hook applied to the projected heads (RoPE and its
scaling rules plug in here, see ``selmerge_jax.positional``); ``AttentionLayerConfig.rope`` builds it from a
``RopeConfig`` or ``CRDNTKConfig``. ``MSAttentionConfig.position_mode`` says where it applies: before
selection, or only on the selected tokens (then the hook needs a ``rotate(x, positions)`` method for the
compact scheme, which ``RopeFn`` and ``CRDNTKFn`` have).
"""

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from selmerge_jax.attention.config import MSAttentionConfig
from selmerge_jax.layers.attention import AttentionSpec, attend
from selmerge_jax.positional import CRDNTKConfig, CRDNTKFn, RopeConfig, make_position_fn
from selmerge_jax.validation import check_positive_int

__all__ = ["AttentionLayerConfig", "MSAttention"]

LayerImplementation = Literal["reference", "pallas", "dense"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionLayerConfig:
    """Shapes and numerics of one attention layer.

    Attributes:
      d_model: D, model width.
      num_heads: N, query heads.
      num_kv_heads: K, kv heads (GQA when K < N); must divide N.
      head_dim: H; default D / N.
      ms: the select-and-merge configuration.
      implementation: "reference" | "pallas" | "dense" (see module docstring).
      use_bias: biases on the q/k/v projections (Qwen-style); o has none.
      rope: position encoding built into the layer's ``position_fn`` when none is passed: a ``RopeConfig``
        (any HF scaling rule) or a ``CRDNTKConfig`` (CRD NTK training / inference rule); None: no positions.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    ms: MSAttentionConfig = dataclasses.field(default_factory=MSAttentionConfig)
    implementation: LayerImplementation = "reference"
    use_bias: bool = False
    rope: RopeConfig | CRDNTKConfig | None = None

    def __post_init__(self):
        for name in ("d_model", "num_heads", "num_kv_heads", "head_dim"):
            check_positive_int(f"AttentionLayerConfig.{name}", getattr(self, name), allow_none=True)
        if self.num_heads % self.kv_heads:
            raise ValueError(f"AttentionLayerConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.kv_heads}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"AttentionLayerConfig.d_model={self.d_model} is not divisible by num_heads="
                             f"{self.num_heads}; set head_dim explicitly")
        if self.implementation not in ("reference", "pallas", "dense"):
            raise ValueError(f"AttentionLayerConfig.implementation={self.implementation!r}; "
                             "allowed: 'reference', 'pallas', 'dense'")
        if self.rope is not None and not isinstance(self.rope, (RopeConfig, CRDNTKConfig)):
            raise TypeError(f"AttentionLayerConfig.rope must be a RopeConfig, CRDNTKConfig or None, got "
                            f"{type(self.rope).__name__}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


class MSAttention(nnx.Module):
    """Self-attention with select-and-merge (or dense) attention: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, config: AttentionLayerConfig, *, rngs: nnx.Rngs,
                 position_fn: Callable | None = None, dtype=None, param_dtype=jnp.float32):
        self.config = config
        if position_fn is None and config.rope is not None:
            position_fn = (CRDNTKFn(config.rope, config.head_size) if isinstance(config.rope, CRDNTKConfig)
                           else make_position_fn(config.rope, config.head_size))
        self.position_fn = position_fn
        n, kh, h, d = config.num_heads, config.kv_heads, config.head_size, config.d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, n * h, use_bias=config.use_bias, **kw)
        self.k_proj = nnx.Linear(d, kh * h, use_bias=config.use_bias, **kw)
        self.v_proj = nnx.Linear(d, kh * h, use_bias=config.use_bias, **kw)
        self.o_proj = nnx.Linear(n * h, d, use_bias=False, **kw)

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """x ``[B, T, D]``; positions ``int [B, T]`` (default ``arange(T)``), used only by ``position_fn``."""
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"x must be [B, T, D={self.config.d_model}], got shape {x.shape}")
        b, t, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_size)
        k = self.k_proj(x).reshape(b, t, cfg.kv_heads, cfg.head_size)
        v = self.v_proj(x).reshape(b, t, cfg.kv_heads, cfg.head_size)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return self.o_proj(self._attend(q, k, v, positions).reshape(b, t, -1))

    def _attend(self, q, k, v, positions):
        cfg = self.config
        dense = cfg.implementation == "dense"
        spec = AttentionSpec(kind="dense" if dense else "ms", ms=cfg.ms, causal=cfg.ms.causal,
                             ms_kernel="reference" if dense else cfg.implementation, dense_kernel="xla")
        return attend(q, k, v, positions, spec, position_fn=self.position_fn)
