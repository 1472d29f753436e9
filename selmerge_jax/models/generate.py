"""Generation: chunked prefill into a static-shape KV cache, then a jit-compiled decode loop.

* Prefill runs the prompt through the model in chunks of ``chunk_size`` tokens inside one ``lax.scan``: each
  chunk appends its k/v to the per-layer ``selmerge_jax.kvcache.KVCache`` and attends over the cache, so the
  largest attention buffer is ``[chunk, capacity]``, linear in the prompt length (never ``T x T``), but the
  work is quadratic. ``prefill_attention="model"`` instead runs the whole prompt in one pass with the model's
  own attention (``layers.attend``: select-and-merge, or dense flash attention), each layer writing its k/v
  into its cache as it goes (``PromptAttention``): the prefill costs what the training forward costs.
* Decode is a ``lax.while_loop`` over ``decode_step`` (one token per row per step, static shapes), which stops
  early when every row has produced an end-of-sequence id. The loop compiles once per (model, shapes,
  sampling).
* Prompts of different lengths are right-padded; padding gets position -1, which the cache stores but never
  attends, so each row behaves as if it were alone.

Everything takes the model as ``nnx.split`` pieces inside ``jax.jit`` (not ``nnx.jit``): the graph is a static
argument and the state a pytree, which keeps Python overhead out of the decode loop.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax import kvcache
from selmerge_jax.layers.attention import AttentionSpec, attend
from selmerge_jax.models import generate_long as long
from selmerge_jax.models.llama import Llama
from selmerge_jax.validation import check_choice, check_number, check_positive_int

__all__ = [
    "PREFILL_ATTENTION",
    "Generation",
    "PromptAttention",
    "SamplingConfig",
    "complete",
    "decode",
    "decode_step",
    "generate",
    "init_caches",
    "prefill",
    "prefill_arguments",
    "prefill_memory",
    "sample_logits",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is drawn from the logits.

    Attributes:
      temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = off).
      top_k: keep only the ``top_k`` most likely tokens (None = off).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        check_number("SamplingConfig.temperature", self.temperature, 0)
        check_number("SamplingConfig.top_p", self.top_p, 0, 1, low_open=True)
        check_positive_int("SamplingConfig.top_k", self.top_k, allow_none=True)


@dataclasses.dataclass(frozen=True)
class Generation:
    """``tokens int32 [B, max_new_tokens]`` (``pad_id`` after a row's end), ``lengths int32 [B]`` (tokens
    generated, the end-of-sequence id included) and, when asked, ``logits float32 [B, max_new_tokens, V]``."""

    tokens: jax.Array
    lengths: jax.Array
    logits: jax.Array | None = None


def sample_logits(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """Next tokens ``int32 [B]`` from ``logits [B, V]`` under ``config`` (greedy when temperature == 0)."""
    logits = logits.astype(jnp.float32)
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Mass strictly before each token: the top token always survives, and a token is kept while the
        # tokens ranked above it have not yet reached top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < config.top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None],
                                                    order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def init_caches(model: Llama, batch: int, capacity: int, dtype=None) -> tuple[kvcache.KVCache, ...]:
    """One empty ``KVCache`` per layer (``[B, K, C, H]``), in the model's compute dtype by default."""
    cfg = model.config
    dtype = cfg.jnp_dtype if dtype is None else dtype
    return _empty_caches(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_size, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _empty_caches(layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype):
    # Under jit so every leaf is its own buffer (buffer donation rejects one array passed twice) and is
    # allocated directly on device; module-level, so a second call with the same sizes reuses the program.
    return tuple(kvcache.init_cache(batch, kv_heads, capacity, head_dim, dtype) for _ in range(layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_fn"), donate_argnames=("caches",))
def _prefill(graphdef, state, caches, tokens, positions, last, cache_fn=None):
    """tokens/positions ``[n, B, c]`` chunks; ``last int [B]``: flat index of each row's last prompt token."""
    model = nnx.merge(graphdef, state)
    n, b, c = tokens.shape

    def body(carry, xs):
        caches, h_last = carry
        tok, pos, i = xs
        h, caches = model.hidden_states(tok, pos, caches=caches, cache_fn=cache_fn)  # h [B, c, D]
        here = (last >= i * c) & (last < (i + 1) * c)
        h_sel = h[jnp.arange(b), jnp.clip(last - i * c, 0, c - 1)]
        return (caches, jnp.where(here[:, None], h_sel, h_last)), None

    h0 = jnp.zeros((b, model.config.d_model), model.config.jnp_dtype)
    (caches, h_last), _ = jax.lax.scan(body, (caches, h0), (tokens, positions, jnp.arange(n)))
    return model.output_logits(h_last), caches


PREFILL_ATTENTION = ("cache", "model")


@dataclasses.dataclass(frozen=True)
class PromptAttention:
    """A ``cache_fn`` for a one-pass prefill: the prompt attends to itself through ``layers.attend``
    (``spec``: select-and-merge or dense flash), then its k/v are written into the layer's cache for decoding.

    q/k arrive rotated (the layer applied RoPE before its cache step), so ``attend`` gets no position hook;
    right-padding (position -1) comes after every real token, so causal attention never shows it to a real
    query, and the cache stores it without ever attending it. Hashable, so it can be a static argument.
    """

    spec: AttentionSpec

    def __call__(self, cache, q, k, v, positions, *, window=None):
        out = attend(q, k, v, positions, self.spec)
        return out, kvcache.append(cache, k, v, positions)


def _chunks(tokens: np.ndarray, lengths: np.ndarray, chunk_size: int):
    """Pads ``[B, T]`` to a multiple of chunk_size and returns ``[n, B, c]`` tokens and positions (-1:
    pad)."""
    b, t = tokens.shape
    padded = -(-t // chunk_size) * chunk_size
    tok = np.zeros((b, padded), np.int32)
    tok[:, :t] = tokens
    pos = np.arange(padded, dtype=np.int32)[None, :].repeat(b, 0)
    pos = np.where(pos < lengths[:, None], pos, -1)
    split = lambda x: x.reshape(b, padded // chunk_size, chunk_size).transpose(1, 0, 2)
    return split(tok), split(pos)


def _check_prompts(prompts, lengths):
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] == 0 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be int [B, T] with T >= 1, got {prompts.dtype} {prompts.shape}")
    b, t = prompts.shape
    lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"lengths must be int [B={b}] with values in [1, T={t}], got {lengths!r}")
    return prompts, lengths


def prefill(model: Llama, prompts, caches, *, lengths=None, chunk_size: int = 256, cache_fn=None,
            prefill_attention: str = "cache", compression: kvcache.KVCompressionConfig | None = None,
            memory_limit: int | None = None):
    """Runs right-padded prompts ``int [B, T]`` (real lengths ``lengths [B]``) into ``caches``.

    ``prefill_attention="cache"``: chunk by chunk, each chunk attending exactly over the cache; ``"model"``:
    the whole prompt in one pass with the model's own attention (``PromptAttention``; ``chunk_size`` and
    ``cache_fn`` are then not used). Returns
    ``(logits float32 [B, V] at each row's last prompt token, caches)``. The caches are donated. ``cache_fn``
    replaces ``llama.append_and_attend`` (hashable: it is a static argument of the compiled scan).

    ``compression`` (a ``KVCompressionConfig`` with a policy): the caches are budget-sized
    (``generate_long.compressed_caches``: each layer's budget is its capacity minus ``slack``) and the prompt
    is compressed *while* it goes through: with ``"model"`` each layer's k/v go into its cache right after the
    one-pass attention, SnapKV's at once (``kvcache.snapkv_once``, the published protocol), the other
    policies' streamed ``slack`` tokens at a time (``kvcache.compress_prompt``); with ``"cache"`` every chunk
    evicts before it is appended (``kvcache.step``). Either way no cache ever holds more than budget + slack
    slots. ``memory_limit``: bytes the prefill may plan (``models.memory.inference_memory``); default the
    device's limit where it reports one (not on CPU), 0: no check. A prompt that does not fit is refused
    before compiling, naming the estimate and the largest prompt that fits.
    """
    args, static = prefill_arguments(model, prompts, caches, lengths=lengths, chunk_size=chunk_size,
                                     cache_fn=cache_fn, prefill_attention=prefill_attention,
                                     compression=compression, memory_limit=memory_limit)
    return _prefill(*args, **static)


def prefill_arguments(model: Llama, prompts, caches, *, lengths=None, chunk_size: int = 256, cache_fn=None,
                      prefill_attention: str = "cache",
                      compression: kvcache.KVCompressionConfig | None = None,
                      memory_limit: int | None = None):
    """``prefill``'s checks and its compiled program's arguments: ``(args, static)`` with
    ``prefill(...) == _prefill(*args, **static)``, so a benchmark can compile it ahead of time
    (``_prefill.lower(*args, **static).compile()``, then call the result with ``args[1:]``)."""
    check_positive_int("chunk_size", chunk_size)
    check_choice("prefill_attention", prefill_attention, PREFILL_ATTENTION)
    prompts, lengths = _check_prompts(prompts, lengths)
    if compression is not None and compression.policy == "none":
        compression = None
    if compression is not None:
        if cache_fn is not None:
            raise ValueError("give compression or cache_fn, not both: compression builds the cache_fn")
        long.check_compression(compression, caches, int(lengths.max()), chunk=chunk_size,
                               prefill_attention=prefill_attention)
    elif cache_fn is None:
        _check_capacity(caches, int(lengths.max()) if prefill_attention == "cache" else prompts.shape[1])
    limit = long.device_memory_limit() if memory_limit is None else (memory_limit or None)
    capacity = getattr(caches[0], "capacity", prompts.shape[1]) if caches else prompts.shape[1]
    long.check_memory(model.config, limit, batch=prompts.shape[0], prompt_len=prompts.shape[1],
                      new_tokens=max(capacity - prompts.shape[1], 0), compression=compression,
                      prefill=prefill_attention, chunk=chunk_size)
    if prefill_attention == "model":
        if cache_fn is not None:
            raise ValueError("prefill_attention='model' writes the full cache; cache_fn "
                             "(a compression policy) applies only with prefill_attention='cache'; "
                             "give compression= instead")
        chunk_size = prompts.shape[1]
        cache_fn = (PromptAttention(model.config.attention_spec) if compression is None
                    else long.CompressedPromptAttention(model.config.attention_spec, compression))
    elif compression is not None:
        cache_fn = long.CompressedStep(compression)
    tok, pos = _chunks(prompts, lengths, chunk_size)
    graphdef, state = nnx.split(model)
    args = (graphdef, state, caches, jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(lengths - 1))
    return args, {"cache_fn": cache_fn}


def _check_capacity(caches, prompt_len: int) -> None:
    """A prompt longer than a full cache would be cut silently under jit (``append`` drops the overflow)."""
    capacity = getattr(caches[0], "capacity", None) if caches else None
    if isinstance(capacity, int) and capacity < prompt_len:
        raise ValueError(f"prompt T={prompt_len} does not fit the caches' capacity={capacity}: a full cache "
                         "holds every prompt token; allocate a larger cache or give compression=")


def decode_step(model: Llama, caches, tokens, positions, key, sampling: SamplingConfig, cache_fn=None,
                layers=None):
    """One decode step: tokens ``int [B]`` at ``positions [B]`` (-1: row finished) ->
    ``(next tokens int32 [B], logits float32 [B, V], caches)``. In a loop of steps pass
    ``layers=model.layer_states()`` made once before the loop (``Llama.layer_states`` says why)."""
    h, caches = model.hidden_states(tokens[:, None], positions[:, None], caches=caches, cache_fn=cache_fn,
                                    layers=layers)
    logits = model.output_logits(h[:, 0])
    return sample_logits(logits, key, sampling), logits, caches


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new", "keep_logits", "cache_fn"),
                   donate_argnames=("caches",))
def _decode(graphdef, state, caches, logits, start, key, pad_id, eos, *, sampling, max_new, keep_logits,
            cache_fn=None):
    """Samples from the prefill logits, then feeds each token back until ``max_new`` or every row ended."""
    model = nnx.merge(graphdef, state)
    b, v = logits.shape
    key, sub = jax.random.split(key)
    first = sample_logits(logits, sub, sampling)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    all_logits = jnp.zeros((b, max_new, v) if keep_logits else (b, 1, v), jnp.float32).at[:, 0].set(logits)
    done = jnp.isin(first, eos)
    lengths = jnp.ones((b,), jnp.int32)
    layers = model.layer_states()  # sliced once, not every step

    def cond(carry):
        i, _, _, _, done, *_ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, caches, out, all_logits, done, lengths, key = carry
        key, sub = jax.random.split(key)
        positions = jnp.where(done, -1, start + i - 1)
        tok, step_logits, caches = decode_step(model, caches, out[:, i - 1], positions, sub, sampling,
                                               cache_fn, layers)
        tok = jnp.where(done, pad_id, tok)
        if keep_logits:
            all_logits = all_logits.at[:, i].set(step_logits)
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, caches, out.at[:, i].set(tok), all_logits, done | jnp.isin(tok, eos), lengths, key

    carry = (jnp.int32(1), caches, out, all_logits, done, lengths, key)
    _, caches, out, all_logits, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
    # Returning the caches lets XLA run the loop in the donated buffers (no second copy of a long cache).
    return out, lengths, (all_logits if keep_logits else None), caches


def decode(model: Llama, caches, logits, start, *, max_new_tokens: int,
           sampling: SamplingConfig = SamplingConfig(),
           key=None, eos_ids: tuple[int, ...] = (), pad_id: int = 0,
           compression: kvcache.KVCompressionConfig | None = None,
           selection: kvcache.DecodeSelection | None = None):
    """The decode loop alone, from a prefilled cache: ``logits [B, V]`` at each row's last prompt token and
    ``start int [B]`` (each row's prompt length). Returns ``(Generation, caches)``; the caches are donated.
    ``compression``: the caches are compressed ones (keep them within budget + slack as decode goes);
    ``selection``: each step attends to its top blocks (``kvcache.DecodeSelection``; the caches come back as
    ``kvcache.SelectiveCache``). (``generate`` is prefill + this; benchmarks time the two apart.)"""
    check_positive_int("max_new_tokens", max_new_tokens)
    if compression is not None and compression.policy == "none":
        compression = None
    if selection is not None and caches and isinstance(caches[0], kvcache.KVCache):
        caches = long.with_selection(caches, selection)
    compression = long.decode_compression(compression, caches, max_new_tokens - 1)
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    eos = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)
    tokens, lens, _, caches = _decode(graphdef, state, caches, logits, jnp.asarray(start, jnp.int32), key,
                                      jnp.int32(pad_id), eos, sampling=sampling, max_new=max_new_tokens,
                                      keep_logits=False,
                                      cache_fn=long.decode_cache_fn(compression, selection))
    return Generation(tokens=tokens, lengths=lens), caches


def generate(model: Llama, prompts, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             key=None, lengths=None, chunk_size: int = 256, capacity: int | None = None,
             eos_ids: tuple[int, ...] | None = None, pad_id: int = 0, return_logits: bool = False,
             caches=None, cache_fn=None, prefill_attention: str = "cache",
             compression: kvcache.KVCompressionConfig | None = None,
             selection: kvcache.DecodeSelection | None = None, memory_limit: int | None = None) -> Generation:
    """Continues right-padded prompts ``int [B, T]`` by up to ``max_new_tokens`` tokens.

    Args:
      sampling: greedy / temperature / top-p / top-k (see ``SamplingConfig``).
      key: PRNG key for sampling (default ``jax.random.key(0)``).
      lengths: real prompt lengths ``[B]`` (default: all T).
      chunk_size: prefill chunk; the prompt is padded up to a multiple of it.
      capacity: cache slots (default: padded prompt + max_new_tokens, the least that fits; rounded up to a
        multiple of ``selection.block`` for selective decode).
      eos_ids: ids that end a row (default: the config's ``eos_token_id``; ``()`` never stops early).
      pad_id: written after a row has ended.
      return_logits: also return every step's logits ``[B, max_new_tokens, V]`` (tests, scoring).
      caches: prebuilt per-layer caches (e.g. a compressed cache of fixed budget) instead of
        ``init_caches(capacity)``; their capacity is then the caller's business.
      cache_fn: replaces ``llama.append_and_attend`` in prefill and decode (e.g. evict, then append).
      prefill_attention: ``"cache"`` (chunked, exact over the cache) or ``"model"`` (one pass with the model's
        own attention, e.g. select-and-merge; see ``prefill``).
      compression: a ``KVCompressionConfig``: budget-sized caches (``generate_long.compressed_caches``,
        budgets from the prompt length T), compressed during the prefill and kept within budget + slack while
        decoding (see ``prefill``).
      selection: a ``kvcache.DecodeSelection``: every decode step attends to its top blocks of the (full or
        compressed) cache plus merged centroids of the rest.
      memory_limit: see ``prefill``.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("chunk_size", chunk_size)
    check_choice("prefill_attention", prefill_attention, PREFILL_ATTENTION)
    prompts, lengths = _check_prompts(prompts, lengths)
    if compression is not None and compression.policy == "none":
        compression = None
    if cache_fn is not None and (compression is not None or selection is not None):
        raise ValueError("give compression/selection or cache_fn, not both: they build the cache_fn")
    if prefill_attention == "model":
        chunk_size = prompts.shape[1]  # one pass
    padded = -(-prompts.shape[1] // chunk_size) * chunk_size
    need = padded + max_new_tokens - 1  # the last sampled token is never fed back
    if compression is not None:
        caches = (long.compressed_caches(model.config, prompts.shape[0], compression, prompts.shape[1])
                  if caches is None else caches)
    else:
        if selection is not None and capacity is None:
            need = -(-need // selection.block) * selection.block
        capacity = need if capacity is None else capacity
        if capacity < need and caches is None:
            raise ValueError(f"capacity={capacity} < padded prompt ({padded}) + max_new_tokens - 1 = {need}")
        caches = init_caches(model, prompts.shape[0], capacity) if caches is None else caches
    if selection is not None:
        if model.config.sliding_window is not None:
            raise ValueError(f"ModelConfig.sliding_window={model.config.sliding_window}: selective decode "
                             "attends whole blocks; use selection=None for a sliding-window model")
        for cache in caches:
            selection.check_capacity(cache.capacity)
    prefill_fn = None if prefill_attention == "model" else cache_fn
    logits, caches = prefill(model, prompts, caches, lengths=lengths, chunk_size=chunk_size,
                             cache_fn=prefill_fn, prefill_attention=prefill_attention,
                             compression=compression, memory_limit=memory_limit)
    if selection is not None:
        caches = long.with_selection(caches, selection)
    if cache_fn is None:
        compression = long.decode_compression(compression, caches, max_new_tokens - 1)
        cache_fn = long.decode_cache_fn(compression, selection)
    # Traced (not static), so changing end ids or pad never recompiles; -1 never matches a sampled id.
    eos = jnp.asarray((model.config.eos_ids if eos_ids is None else tuple(eos_ids)) or (-1,), jnp.int32)
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    tokens, lens, all_logits, _ = _decode(graphdef, state, caches, logits, jnp.asarray(lengths), key,
                                          jnp.int32(pad_id), eos, sampling=sampling, max_new=max_new_tokens,
                                          keep_logits=return_logits, cache_fn=cache_fn)
    return Generation(tokens=tokens, lengths=lens, logits=all_logits)


def complete(model: Llama, tokenizer, text: str, *, max_new_tokens: int = 64, **kwargs) -> str:
    """Text in, text out: encodes ``text`` (with BOS), generates, decodes up to the end-of-sequence id."""
    ids = tokenizer.encode(text, add_bos=True)[None]
    out = generate(model, ids, max_new_tokens=max_new_tokens, eos_ids=(tokenizer.eos_id,),
                   pad_id=tokenizer.pad_id, **kwargs)
    n = int(out.lengths[0])
    return tokenizer.decode(np.asarray(out.tokens[0, :n]))


def prefill_memory(model: Llama, *, batch: int, prompt_len: int, chunk_size: int = 256,
                   capacity: int | None = None, prefill_attention: str = "cache",
                   compression: kvcache.KVCompressionConfig | None = None) -> dict[str, int]:
    """Bytes XLA plans for a compiled prefill of ``prompt_len`` tokens (compiled, never run).

    Returns ``temp`` (scratch, e.g. the ``[chunk, capacity]`` attention buffer, or a one-pass prefill's
    layer activations), ``argument`` (params + caches + tokens), ``output``, ``cache`` (the caches' bytes) and
    ``peak = argument + output + temp - alias`` (donated caches are aliased). ``compression``: budget-sized
    caches compressed during the prefill, as ``prefill(compression=...)`` runs it.
    """
    check_choice("prefill_attention", prefill_attention, PREFILL_ATTENTION)
    if prefill_attention == "model":
        chunk_size = prompt_len
    n = -(-prompt_len // chunk_size)
    graphdef, state = nnx.split(model)
    if compression is not None and compression.policy != "none":
        caches = jax.eval_shape(lambda: long.compressed_caches(model.config, batch, compression, prompt_len))
        cache_fn = (long.CompressedPromptAttention(model.config.attention_spec, compression)
                    if prefill_attention == "model" else long.CompressedStep(compression))
    else:
        capacity = capacity or n * chunk_size
        caches = jax.eval_shape(lambda: init_caches(model, batch, capacity))
        cache_fn = PromptAttention(model.config.attention_spec) if prefill_attention == "model" else None
    chunk = jax.ShapeDtypeStruct((n, batch, chunk_size), jnp.int32)
    last = jax.ShapeDtypeStruct((batch,), jnp.int32)
    stats = _prefill.lower(graphdef, state, caches, chunk, chunk, last, cache_fn).compile().memory_analysis()
    out = {"temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
           "output": stats.output_size_in_bytes, "alias": stats.alias_size_in_bytes,
           "cache": sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(caches))}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out
