"""Long-prompt pieces of generation: a one-pass prefill that compresses as it goes, compressed and selective
decode steps, budget-sized caches, and the checks that name what does not fit.

Every class here is a frozen, hashable ``cache_fn`` (a static argument of the compiled prefill and decode):

* :class:`CompressedPromptAttention`: the prompt attends to itself through ``layers.attend``
  (select-and-merge or dense flash), then its k/v go into the layer's budget-sized cache: SnapKV at once, as
  published (``kvcache.snapkv_once``, ``kvcache.one_shot``), the other policies streamed ``slack`` tokens at a
  time (``kvcache.compress_prompt``). Either way the cache never holds more than ``budget + slack`` slots,
  whatever the prompt.
* :class:`CompressedStep`: ``kvcache.step`` (make room, append, attend over the cache, observe): the chunked
  prefill and the dense decode over a compressed cache.
* :class:`SelectiveDecode`: ``kvcache.selective_step``: each decode step attends to its top blocks (+ merged
  centroids), over a full cache or a compressed one.

A layer's budget is its cache's capacity minus ``slack`` (``compressed_caches`` allocates
``KVCompressionConfig.capacity_for``), so per-layer budgets need nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from selmerge_jax import kvcache
from selmerge_jax.kvcache import DecodeSelection, KVCompressionConfig
from selmerge_jax.layers.attention import AttentionSpec, attend
from selmerge_jax.models import memory
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.validation import fail

__all__ = ["PROMPT_ONLY_POLICIES", "CompressedPromptAttention", "CompressedStep", "SelectiveDecode",
           "check_compression", "check_memory", "compressed_caches", "decode_cache_fn", "decode_compression",
           "device_memory_limit", "with_selection"]


def _budget(cache, config: KVCompressionConfig) -> int:
    return cache.capacity - config.slack


@dataclasses.dataclass(frozen=True)
class CompressedPromptAttention:
    """One-pass prefill into a compressed cache (see the module docstring).

    ``cache_before_next_layer``: ``Llama.hidden_states`` starts each layer of a long prompt only after the
    previous layer's compressed cache is written, so no layer's prompt-long q/k/v outlive it (a 1M-token
    prompt into a 1/8 budget asked XLA for 103 GiB of temporaries on an H200 without it)."""

    spec: AttentionSpec
    config: KVCompressionConfig
    cache_before_next_layer: ClassVar[bool] = True

    def __call__(self, cache, q, k, v, positions, *, window=None):
        out = attend(q, k, v, positions, self.spec)
        budget = _budget(cache, self.config)
        if kvcache.one_shot(self.config):
            cache = kvcache.snapkv_once(cache, self.config, q, k, v, positions, budget=budget, window=window)
            return out, cache
        cache = kvcache.compress_prompt(cache, self.config, q, k, v, positions, chunk=self.config.slack,
                                        budget=budget, window=window)
        return out, cache


@dataclasses.dataclass(frozen=True)
class CompressedStep:
    """``kvcache.step`` with the layer's budget: chunked prefill and dense decode over a compressed cache."""

    config: KVCompressionConfig

    def __call__(self, cache, q, k, v, positions, *, window=None):
        return kvcache.step(cache, self.config, q, k, v, positions, budget=_budget(cache, self.config),
                            window=window)


@dataclasses.dataclass(frozen=True)
class SelectiveDecode:
    """``kvcache.selective_step`` over a ``SelectiveCache`` (full, or compressed with ``config``)."""

    selection: DecodeSelection
    config: KVCompressionConfig | None = None

    def __call__(self, sc, q, k, v, positions, *, window=None):
        if window is not None:
            fail("ModelConfig.sliding_window", window,
                 "None for a selective decode (blocks are not windowed)")
        budget = None if self.config is None else _budget(sc, self.config)
        return kvcache.selective_step(sc, self.selection, q, k, v, positions, config=self.config,
                                      budget=budget)


def compressed_caches(config: ModelConfig, batch: int, compression: KVCompressionConfig, prompt_len: int,
                      dtype=None) -> tuple[kvcache.KVCache, ...]:
    """One budget-sized cache per layer: ``compression.capacity_for(prompt_len, layer)`` slots (budget +
    slack), in the model's compute dtype by default."""
    dtype = config.jnp_dtype if dtype is None else dtype
    return tuple(kvcache.init_for(compression, batch, config.num_kv_heads,
                                  compression.capacity_for(prompt_len, i), config.head_size, dtype)
                 for i in range(config.num_layers))


def check_compression(compression: KVCompressionConfig, caches, prompt_len: int, *, chunk: int,
                      prefill_attention: str) -> None:
    """Bad input named before anything compiles: storage this path does not stream, caches that are not
    ``budget + slack`` slots, a budget that would compress nothing, a prefill chunk larger than the slack."""
    if compression.quant != "none":
        fail("KVCompressionConfig.quant", compression.quant,
             "'none' for a compressing prefill through generate (int8/int4 storage: kvcache.quantized_step "
             "as cache_fn)")
    if prefill_attention == "cache" and chunk > compression.slack:
        fail("chunk_size", chunk, f"<= KVCompressionConfig.slack={compression.slack}: a prompt chunk must "
             "fit the free slots above the budget (raise slack or lower chunk_size)")
    for i, cache in enumerate(caches):
        if not isinstance(cache, kvcache.KVCache):
            fail(f"caches[{i}]", type(cache).__name__, "a KVCache (kvcache.init_for or compressed_caches)")
        budget = _budget(cache, compression)
        if budget < compression.min_budget:
            fail(f"caches[{i}].capacity", cache.capacity,
                 f">= budget + slack with budget >= {compression.min_budget} (sink + recent + reserved); "
                 f"build the caches with compressed_caches")
        if budget >= prompt_len:
            fail(f"KVCompressionConfig budget of layer {i}", budget,
                 f"smaller than the prompt (T={prompt_len} tokens): nothing would be compressed; use "
                 "compression=None (a full cache) or a smaller budget")


def with_selection(caches, selection: DecodeSelection):
    """Wraps prefilled caches for selective decode (builds each layer's block index once)."""
    return tuple(kvcache.init_selective(c, selection) for c in caches)


PROMPT_ONLY_POLICIES = ("streaming", "snapkv")  # what they keep is decided from the prompt alone


def decode_compression(compression: KVCompressionConfig | None, caches, steps: int):
    """The compression a decode of ``steps`` cache writes must run at every step, or None.

    SnapKV as published compresses once, after the prompt, and StreamingLLM keeps sinks and the newest
    tokens: neither reads anything a decode step observes. So when every cache has ``steps`` free slots
    (no compression can fire before the decode ends) their decode is the model's plain step over the
    compressed cache: the same outputs without the per-step scoring (``kvcache.step``'s ``lax.cond`` and
    the window-vote update). Their votes stay the prompt's, so a later decode call that does compress ranks
    by the prompt's window (SnapKV's own choice), where one long scoring decode would have ranked by its
    latest queries: split a generation into calls only where that difference is wanted. Other policies
    (H2O, TOVA) accumulate what decode steps see, and a cache without room compresses as it goes: both keep
    ``compression``. Reads each cache's write cursor (one small device read per decode call); traced caches
    keep ``compression``."""
    if compression is None or compression.policy not in PROMPT_ONLY_POLICIES:
        return compression
    try:
        free = min(c.capacity - int(getattr(c, "cache", c).length) for c in caches)
    except jax.errors.ConcretizationTypeError:
        return compression
    return None if free >= steps else compression


def decode_cache_fn(compression: KVCompressionConfig | None, selection: DecodeSelection | None):
    """The decode step for a (compressed, selective) cache; None: the model's default (dense, full)."""
    if selection is not None:
        return SelectiveDecode(selection, compression)
    return None if compression is None else CompressedStep(compression)


def device_memory_limit() -> int | None:
    """The first device's memory limit in bytes, or None where the backend reports none (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def check_memory(config: ModelConfig, limit: int | None, *, batch: int, prompt_len: int, new_tokens: int,
                 compression: KVCompressionConfig | None, prefill: str, chunk: int) -> None:
    """Refuses, before compiling, a prefill whose planned bytes exceed ``limit`` (``models.memory``): the
    error names the estimate by part and the largest prompt that fits. ``limit=None``: no check."""
    if limit is None:
        return
    memory.check_inference_fits(config, limit, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                                compression=compression, prefill=prefill, chunk=chunk)

