"""A Llama/Mistral-family decoder in Flax NNX: RMSNorm, SwiGLU, GQA, RoPE, dense or select-and-merge
attention.

Attribute names mirror Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``, ``layers[i].self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ...), so checkpoint import/export (``hf_import.py``) is a rename plus
a transpose of each matrix: NNX kernels are ``[in, out]``, torch weights ``[out, in]``.

Decoder layers are stored stacked (every variable of ``model.layers`` has a leading ``[L]`` axis) and scanned,
so compile time is independent of depth; ``hf_import`` and ``lora`` name tensors per layer (``layers.{i}``)
when they talk to Hugging Face files.

Two ways to run it:

* ``model(tokens, positions, segment_ids=...)`` -> logits: the training/scoring path, self-attention over the
  whole sequence through ``layers.attention.attend`` (dense flash / XLA with causal + sliding-window +
  segment masks, select-and-merge, or their ring versions).
* ``model.hidden_states(tokens, positions, caches=...)``: the inference path. Each layer appends its new k/v
  to its ``selmerge_jax.kvcache.KVCache`` and attends over the cache (causal by stored position), so prefill
  can be chunked and decode is one token per step with static shapes. This path is exact attention over the
  cache whatever ``config.attention`` says; decode-time selection or eviction plugs in through ``cache_fn``
  (see ``append_and_attend``), which is where the KV-compression policies live.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from selmerge_jax import kvcache
from selmerge_jax.layers.attention import attend
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.positional import RotaryPositions, make_position_fn
from selmerge_jax.validation import check_int, fail

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "Llama",
    "RMSNorm",
    "append_and_attend",
    "cache_attention",
    "count_params",
    "project_together",
    "rms_norm",
    "residual_chunked",
]


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


def project_together(x: jax.Array, projections) -> list[jax.Array]:
    """``[p(x) for p in projections]`` computed as one matmul of x with the kernels side by side.

    For projections that read the same input (q/k/v, gate/up): one GEMM with a wider output instead of two or
    three, and in the backward one dX GEMM over the concatenated output gradients instead of a sum of GEMMs
    that each re-accumulate the ``[T, D]`` result. The kernels stay separate parameters (checkpoint and HF
    names do not change); their concatenation costs one copy of the weights per call. Each projection is an
    ``nnx.Linear`` or a ``lora.LoRALinear``: biases and low-rank adapter terms are added per projection.
    """
    ins = [p.kernel.shape[-2] for p in projections]
    if not projections or len(set(ins)) != 1 or ins[0] != x.shape[-1]:
        fail("projections", f"{len(projections)} with input widths {ins}", f"one or more reading x's last "
             f"axis ({x.shape[-1]}), every one the same width")
    first = projections[0]
    dtype = first.dtype or x.dtype
    x = x.astype(dtype)
    kernel = jnp.concatenate([p.kernel[...].astype(dtype) for p in projections], axis=-1)
    y = jnp.dot(x, kernel, precision=first.precision)
    widths = [p.kernel.shape[-1] for p in projections]
    outs = jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=-1)
    for i, p in enumerate(projections):
        if p.bias is not None:
            outs[i] = outs[i] + p.bias[...].astype(dtype)
        adapter = getattr(p, "adapter_term", None)  # LoRALinear's low-rank update, None once merged
        if adapter is not None and (term := adapter(x)) is not None:
            outs[i] = outs[i] + term
    return outs


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; gate and up as one matmul when called with ``fuse``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.ffn_dim
        self.gate_proj = _linear(config, d, f, rngs)
        self.up_proj = _linear(config, d, f, rngs)
        self.down_proj = _linear(config, f, d, rngs)

    def __call__(self, x: jax.Array, fuse: bool = False) -> jax.Array:
        if fuse:
            gate, up = project_together(x, [self.gate_proj, self.up_proj])
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")  # what remat="save" keeps
        return self.down_proj(jax.nn.silu(gate) * up)


def cache_attention(cache: kvcache.KVCache, q, positions, window: int | None):
    """Attention of q ``[B, T, N, H]`` at ``positions`` over a cache that already holds these tokens.

    With a sliding window each query sees only the slots of the last ``window`` positions up to its own,
    decided per query (``kvcache.attend(window=...)``), so chunked prefill of a prompt longer than the window
    is exact.
    """
    return kvcache.attend(cache, q, positions, window=window)


def append_and_attend(cache, q, k, v, positions, *, window: int | None = None):
    """The default cache step: write the new k/v ``[B, T, K, H]``, then attend q ``[B, T, N, H]`` over the
    cache.

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

    def __call__(self, x, positions, cache=None, segment_ids=None, cache_fn: Callable | None = None,
                 fuse: bool = False):
        """x ``[B, T, D]``, positions ``int [B, T]`` -> (``[B, T, D]``, updated cache or None).

        ``fuse``: q/k/v as one matmul (``project_together``), decided by ``DecoderLayer``."""
        cfg = self.config
        b, t, _ = x.shape
        if fuse:
            q, k, v = project_together(x, [self.q_proj, self.k_proj, self.v_proj])
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_size)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_size)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_size)
        position_fn = _position_fn(cfg.rope, cfg.head_size)
        if cache is not None:
            q, k = position_fn(q, k, positions)
            out, cache = (cache_fn or append_and_attend)(cache, q, k, v, positions, window=cfg.sliding_window)
        else:
            out = attend(q, k, v, positions, cfg.attention_spec, position_fn=position_fn,
                         segment_ids=segment_ids)
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
        cfg = self.self_attn.config
        # fuse_projections on the training/scoring path only: a decode loop would hold (or copy every token) a
        # concatenated copy of every layer's kernels
        fuse = cfg.fuse_projections and cache is None
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, segment_ids, cache_fn, fuse)
        x = checkpoint_name(x + h, "attn_mid")
        mlp = lambda y: self.mlp(self.post_attention_layernorm(y), fuse)
        if cache is not None:  # inference: a long prompt's [B, T, F] intermediates never exist whole
            return residual_chunked(mlp, x, MLP_CHUNK), cache
        if cfg.mlp_chunk is not None and x.shape[1] > cfg.mlp_chunk:
            return residual_sliced(mlp, x, cfg.mlp_chunk, cfg.remat_policy), cache
        return x + mlp(x), cache


MLP_CHUNK = 8192  # tokens per MLP slice of a one-pass prefill (the F-wide intermediates of 8K tokens)
BARRIER_MIN_TOKENS = 8192  # inference calls this long run their layers strictly one after another


def residual_chunked(fn, x: jax.Array, chunk: int) -> jax.Array:
    """``x + fn(x)`` for a token-wise ``fn`` (``[B, c, D] -> [B, c, D]``), ``chunk`` tokens at a time, each
    slice's sum written back into ``x``'s own buffer.

    A 1M-token prompt through a Llama-3-8B MLP would otherwise hold three ``[T, 14336]`` bf16 buffers (84 GiB)
    at once; a loop over slices holds one slice's. The loop carries the residual itself: a separate output
    buffer would start as a broadcast of zeros that XLA shares between layers and copies once per layer's
    loop, and it schedules those copies early, so one ``[T, D]`` buffer per layer lived through the whole
    prefill (~256 KB per token for an 8B model, 128 GiB at 512K: the measured 512K plans).
    """
    check_int("chunk", chunk, 1)
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, D], got shape {x.shape}")
    t = x.shape[1]
    if t <= chunk:
        return x + fn(x)
    n, tail = divmod(t, chunk)

    def body(i, h):
        piece = jax.lax.dynamic_slice_in_dim(h, i * chunk, chunk, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(h, piece + fn(piece).astype(h.dtype), i * chunk, axis=1)

    h = jax.lax.fori_loop(0, n, body, x)
    if tail:  # the last partial slice, statically shaped
        piece = h[:, n * chunk:]
        h = h.at[:, n * chunk:].set(piece + fn(piece).astype(h.dtype))
    return h


def residual_sliced(fn, x: jax.Array, chunk: int, policy) -> jax.Array:
    """``x + fn(x)`` for a token-wise ``fn``, ``chunk`` tokens at a time, each slice under ``jax.checkpoint``
    with ``policy`` (``ModelConfig.mlp_chunk``).

    Unlike ``residual_chunked`` (inference, in place) this is for differentiation: a ``lax.map`` over the
    slices, whose backward recomputes and differentiates one slice at a time, so it holds one slice's
    intermediates. With ``policy`` None (no remat) the slices' residuals are kept, as unsliced.
    """
    check_int("chunk", chunk, 1)
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, D], got shape {x.shape}")
    b, t, d = x.shape
    n, tail = divmod(t, chunk)
    body = lambda piece: piece + fn(piece).astype(piece.dtype)
    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    head = jax.lax.map(body, x[:, :n * chunk].reshape(b, n, chunk, d).swapaxes(0, 1))
    head = head.swapaxes(0, 1).reshape(b, n * chunk, d)
    return jnp.concatenate([head, body(x[:, n * chunk:])], axis=1) if tail else head


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One ``DecoderLayer`` whose every variable carries a leading ``[L]`` axis: layer i's weights at index i.

    Built with ``jax.vmap`` over L keys, so each layer draws its own initial weights, and under
    ``nnx.eval_shape`` nothing is materialised.
    """
    keys = jax.random.split(rngs.params(), config.num_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLayer(config, rngs=nnx.Rngs(0))))

    def one(key):
        return nnx.split(DecoderLayer(config, rngs=nnx.Rngs(params=key)))[1]

    return nnx.merge(graphdef, jax.vmap(one)(keys))


class Llama(nnx.Module):
    """Decoder-only transformer: ``tokens [B, T] -> logits [B, T, V]`` (float32).

    The decoder layers are stored stacked (``self.layers``: one ``DecoderLayer`` whose variables are
    ``[L, ...]``) and run by ``jax.lax.scan`` on the training/scoring path, so compile time does not grow with
    depth. The inference path (``caches=...``) runs them in a Python loop over per-layer slices, because each
    layer owns its own cache (and, for compression policies, its own budget and head classes). ``layer(i)`` is
    layer i.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.d_model, dtype=config.jnp_dtype,
                                      param_dtype=config.jnp_param_dtype,
                                      embedding_init=nnx.initializers.normal(config.init_std), rngs=rngs)
        self.layers = _stacked_layers(config, rngs)
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.jnp_param_dtype)
        self.lm_head = None if config.tie_embeddings else _linear(config, config.d_model, config.vocab_size,
                                                                  rngs)

    def __call__(self, tokens, positions=None, *, segment_ids=None) -> jax.Array:
        """Logits ``float32 [B, T, V]`` of a full causal forward (training and scoring)."""
        return self.output_logits(self.hidden_states(tokens, positions, segment_ids=segment_ids)[0])

    def layer(self, i: int) -> DecoderLayer:
        """Layer ``i`` as a module of its own (a view of slice i: changing it does not change the model)."""
        check_int("layer index i", i, 0, self.config.num_layers - 1)
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def layer_states(self) -> tuple:
        """``(graphdef, states)``: every layer's variables sliced out of the stacked ``[L]`` axis, one state
        per layer, for :meth:`hidden_states` ``(layers=...)``.

        A decode loop calls ``hidden_states`` once per token; slicing the stacked weights inside the loop
        makes XLA copy most of them every step (~13 GB a token at the 8B shape: 6.3 of a dense 8K step's
        13.3 ms on an H200, ``experiments/results/inference_h200``). Sliced once before the loop, they are
        copied once per loop, at the price of a second copy of the layer weights while it runs."""
        graphdef, state = nnx.split(self.layers)
        layers = range(self.config.num_layers)
        return graphdef, tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in layers)

    def hidden_states(self, tokens, positions=None, *, caches=None, segment_ids=None,
                      cache_fn: Callable | None = None, layers: tuple | None = None):
        """Final-norm hidden states ``[B, T, D]`` and the updated per-layer caches (None without caches).

        Args:
          tokens: ``int [B, T]``.
          positions: ``int [B, T]``, default ``arange(T)``; with caches, negative positions mark padding
            (written to the cache but never attended). Or a ``RotaryPositions`` (positions plus traced
            frequencies, e.g. one CRD NTK training step), which every layer's RoPE accepts.
          caches: a sequence of ``L`` ``KVCache`` (see ``generate.init_caches``), or None for self-attention.
          segment_ids: ``int [B, T]`` for packed sequences (no caches): dense or ``attention="ms"``; a
            document starting at a multiple of ``block_size * merge`` with positions restarting there gets the
            logits it gets alone (``layers.attend``).
          cache_fn: replaces ``append_and_attend`` (same signature) for every layer's cache step.
          layers: :meth:`layer_states` computed once outside a loop of calls (with caches only); default:
            sliced here.
        """
        tokens = _check_tokens(tokens)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        shape = jnp.shape(positions.positions if isinstance(positions, RotaryPositions) else positions)
        if shape != (b, t):
            raise ValueError(f"positions must be int [B={b}, T={t}], got shape {shape}")
        x = self.embed_tokens(tokens)
        if caches is None:
            if layers is not None:
                fail("layers", type(layers).__name__, "None without caches (the scanned forward reads the "
                     "stacked weights; layer_states serves a loop of cached calls)")
            return self.norm(self._scan_layers(x, positions, segment_ids)), None
        if len(caches) != self.config.num_layers:
            raise ValueError("caches must hold one KVCache per layer "
                             f"({self.config.num_layers}), got {len(caches)}")
        if layers is None:
            graphdef, state = nnx.split(self.layers)
            slice_of = lambda state, i: jax.tree.map(lambda a: a[i], state)
        else:
            graphdef, state = layers
            slice_of = lambda states, i: states[i]
            if len(state) != self.config.num_layers:
                raise ValueError(f"layers must hold one state per layer ({self.config.num_layers}), "
                                 f"got {len(state)}: pass model.layer_states()")
        new_caches: list = []
        ordered = getattr(cache_fn, "cache_before_next_layer", False)
        for i, cache in enumerate(caches):
            if t >= BARRIER_MIN_TOKENS:
                # Layer i's weight slices and RoPE tables wait for layer i - 1's output: without the barrier
                # XLA's GPU schedule makes every layer's slice copies (~0.44 GiB each at 8B) and tables
                # first and holds them all through a long prompt. Decode steps (few tokens) skip it.
                x, positions, state = jax.lax.optimization_barrier((x, positions, state))
                if ordered and new_caches:
                    # A cache step whose result nothing else reads (a compression into a fresh cache) could be
                    # scheduled after later layers, holding its prompt-long q/k/v until then: layer i waits
                    # for layer i - 1's cache too.
                    x, new_caches[-1] = jax.lax.optimization_barrier((x, new_caches[-1]))
            layer = nnx.merge(graphdef, slice_of(state, i))
            x, cache = layer(x, positions, cache, None, cache_fn)
            new_caches.append(cache)
        return self.norm(x), tuple(new_caches)

    def _scan_layers(self, x, positions, segment_ids):
        """``x [B, T, D]`` through every layer: one ``lax.scan`` step per layer, remat inside the step."""
        graphdef, state = nnx.split(self.layers)

        def step(h, layer_state):
            h = checkpoint_name(h, "layer_input")  # what remat="offload" moves to host memory
            return nnx.merge(graphdef, layer_state)(h, positions, None, segment_ids)[0], None

        if self.config.remat_policy is not None:
            step = jax.checkpoint(step, policy=self.config.remat_policy, prevent_cse=False)
        return jax.lax.scan(step, x, state)[0]

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
