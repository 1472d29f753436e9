"""A Llama/Mistral-family decoder in Flax NNX: RMSNorm, SwiGLU, GQA, RoPE, dense or select-and-merge attention.

Attribute names mirror Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``, ``layers[i].self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ...), so checkpoint import/export (``hf_import.py``) is a rename plus a
transpose of each matrix: NNX kernels are ``[in, out]``, torch weights ``[out, in]``.

Two ways to run it:

* ``model(tokens, positions, segment_ids=...)`` -> logits: the training/scoring path, self-attention over the
  whole sequence (dense with causal + sliding-window + segment masks, or select-and-merge).
* ``model.hidden_states(tokens, positions, caches=...)``: the inference path. Each layer appends its new k/v to
  its ``selmerge_jax.kvcache.KVCache`` and attends over the cache (causal by stored position), so prefill can be
  chunked and decode is one token per step with static shapes. This path is exact attention over the cache
  whatever ``config.attention`` says; decode-time selection or eviction plugs in through ``cache_fn``
  (see ``append_and_attend``), which is where the KV-compression policies live.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from selmerge_jax import kvcache
from selmerge_jax.attention import ms_attention
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.positional import RotaryPositions, make_position_fn
from selmerge_jax.sharding.ring_ms import sequence_parallel_attention

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "Llama",
    "RMSNorm",
    "append_and_attend",
    "cache_attention",
    "count_params",
    "dense_self_attention",
    "rms_norm",
]

_MS_BACKENDS = {"reference": "xla", "pallas": None}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x) * scale``; statistics in float32 (bf16 squares lose too much), result in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    # Cast before scaling, as HF does, so bf16 runs round at the same place as the reference.
    return y.astype(x.dtype) * scale.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def _position_fn(rope, head_dim: int):
    # Built once per (rope config, head dim): frequencies are trace-time constants, not per-call work.
    return make_position_fn(rope, head_dim)


def _linear(config: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype,
                      kernel_init=nnx.initializers.normal(config.init_std), rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.ffn_dim
        self.gate_proj = _linear(config, d, f, rngs)
        self.up_proj = _linear(config, d, f, rngs)
        self.down_proj = _linear(config, f, d, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def dense_self_attention(q, k, v, *, window: int | None = None, segment_ids=None):
    """Causal attention of q ``[B, T, N, H]`` over k/v ``[B, T, K, H]`` (GQA), optional window and segments.

    ``jax.nn.dot_product_attention`` picks cuDNN flash attention on GPU and XLA elsewhere; it masks by index,
    so packed sequences must pass ``segment_ids`` ``int [B, T]``. A window W lets query i see keys
    ``i - W + 1 .. i`` (Mistral's convention: W tokens including itself).
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local)


def cache_attention(cache: kvcache.KVCache, q, positions, window: int | None):
    """Attention of q ``[B, T, N, H]`` at ``positions`` over a cache that already holds these tokens.

    With a sliding window each query sees only the slots of the last ``window`` positions up to its own, decided
    per query (``kvcache.attend(window=...)``), so chunked prefill of a prompt longer than the window is exact.
    """
    return kvcache.attend(cache, q, positions, window=window)


def append_and_attend(cache, q, k, v, positions, *, window: int | None = None):
    """The default cache step: write the new k/v ``[B, T, K, H]``, then attend q ``[B, T, N, H]`` over the cache.

    Returns ``(out [B, T, N, H], cache)``. Anything with this signature can replace it (``cache_fn`` of
    ``Llama.hidden_states`` and ``generate``): e.g. a KV-compression policy that evicts before appending, or a
    quantised cache pytree with its own append/attend.
    """
    cache = kvcache.append(cache, k, v, positions)
    return cache_attention(cache, q, positions, window), cache


class Attention(nnx.Module):
    """GQA self-attention with RoPE; dispatches to dense, select-and-merge or KV-cache attention."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        n, kh, h, d = config.num_heads, config.num_kv_heads, config.head_size, config.d_model
        bias = config.attention_bias
        self.q_proj = _linear(config, d, n * h, rngs, bias)
        self.k_proj = _linear(config, d, kh * h, rngs, bias)
        self.v_proj = _linear(config, d, kh * h, rngs, bias)
        self.o_proj = _linear(config, n * h, d, rngs, bias)

    def __call__(self, x, positions, cache=None, segment_ids=None, cache_fn: Callable | None = None):
        """x ``[B, T, D]``, positions ``int [B, T]`` -> (``[B, T, D]``, updated cache or None)."""
        cfg = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_size)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_size)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_size)
        q, k = _position_fn(cfg.rope, cfg.head_size)(q, k, positions)
        if cache is not None:
            out, cache = (cache_fn or append_and_attend)(cache, q, k, v, positions, window=cfg.sliding_window)
        elif cfg.attention in ("ring", "ring_ms"):
            if segment_ids is not None:
                raise ValueError(f"segment_ids (packed sequences) are not supported with attention={cfg.attention!r}")
            ms = cfg.attention == "ring_ms"
            out = sequence_parallel_attention(q, k, v, axis_name=cfg.sequence_axis, ms_config=cfg.ms if ms else None,
                                              implementation=_MS_BACKENDS[cfg.ms_kernel] if ms else None)
        elif cfg.attention == "ms":
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) are not supported with attention='ms'")
            out = ms_attention(q, k, v, cfg.ms, implementation=_MS_BACKENDS[cfg.ms_kernel])
        else:
            out = dense_self_attention(q, k, v, window=cfg.sliding_window, segment_ids=segment_ids)
        return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pd = config.jnp_param_dtype
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps, pd)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps, pd)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, cache=None, segment_ids=None, cache_fn: Callable | None = None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, segment_ids, cache_fn)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _run_layer(layer: DecoderLayer, x, positions, segment_ids):
    return layer(x, positions, None, segment_ids)[0]


class Llama(nnx.Module):
    """Decoder-only transformer: ``tokens [B, T] -> logits [B, T, V]`` (float32)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.d_model, dtype=config.jnp_dtype,
                                      param_dtype=config.jnp_param_dtype,
                                      embedding_init=nnx.initializers.normal(config.init_std), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.jnp_param_dtype)
        self.lm_head = None if config.tie_embeddings else _linear(config, config.d_model, config.vocab_size, rngs)

    def __call__(self, tokens, positions=None, *, segment_ids=None) -> jax.Array:
        """Logits ``float32 [B, T, V]`` of a full causal forward (training and scoring)."""
        return self.output_logits(self.hidden_states(tokens, positions, segment_ids=segment_ids)[0])

    def hidden_states(self, tokens, positions=None, *, caches=None, segment_ids=None,
                      cache_fn: Callable | None = None):
        """Final-norm hidden states ``[B, T, D]`` and the updated per-layer caches (None without caches).

        Args:
          tokens: ``int [B, T]``.
          positions: ``int [B, T]``, default ``arange(T)``; with caches, negative positions mark padding
            (written to the cache but never attended). Or a ``RotaryPositions`` (positions plus traced
            frequencies, e.g. one CRD NTK training step), which every layer's RoPE accepts.
          caches: a sequence of ``L`` ``KVCache`` (see ``generate.init_caches``), or None for self-attention.
          segment_ids: ``int [B, T]`` for packed sequences (dense attention only, no caches).
          cache_fn: replaces ``append_and_attend`` (same signature) for every layer's cache step.
        """
        tokens = _check_tokens(tokens)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        shape = jnp.shape(positions.positions if isinstance(positions, RotaryPositions) else positions)
        if shape != (b, t):
            raise ValueError(f"positions must be int [B={b}, T={t}], got shape {shape}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches must hold one KVCache per layer ({len(self.layers)}), got {len(caches)}")
        x = self.embed_tokens(tokens)
        new_caches = [] if caches is not None else None
        for i, layer in enumerate(self.layers):
            if caches is not None:
                x, cache = layer(x, positions, caches[i], None, cache_fn)
                new_caches.append(cache)
            elif self.config.remat_policy is not None:
                x = nnx.remat(_run_layer, policy=self.config.remat_policy)(layer, x, positions, segment_ids)
            else:
                x = layer(x, positions, None, segment_ids)[0]
        return self.norm(x), (tuple(new_caches) if new_caches is not None else None)

    def output_logits(self, h: jax.Array) -> jax.Array:
        """``[..., D] -> float32 [..., V]`` through ``lm_head`` or the tied embedding."""
        logits = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)


def _check_tokens(tokens):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be int [B, T], got dtype {tokens.dtype} shape {tokens.shape}")
    return tokens


def count_params(model_or_state) -> int:
    """Number of parameter elements (works on abstract models from ``nnx.eval_shape``)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(state))
