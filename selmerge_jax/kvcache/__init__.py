"""KV-cache compression for long-context inference: a static-shape GQA-native cache pytree and policies.

Per layer and per call (prefill chunk or decode step), inside the jitted model::

    config = KVCompressionConfig(policy="snapkv", ratio=0.1, slack=256)    # slack >= prefill chunk
    budget = config.budget_for(prompt_len, layer)                           # static Python int
    cache = init_for(config, B, K, budget + config.slack, H, jnp.bfloat16)  # once, before prefill
    out, cache = step(cache, config, q, k, v, positions, budget=budget)     # room, append, attend, observe

``step`` compresses back to ``budget`` only when the incoming tokens would not fit (a ``lax.cond``), so a
decode loop compiles once and compresses every ``slack`` steps. Optional one-shot compression after the prompt
(SnapKV's protocol): ``lax.cond(cache.length > budget, lambda c: compress(c, config, budget), lambda c: c,
cache)``; with a capacity that holds the prompt, SnapKV's kept set does not depend on the prefill chunk.
``KVCompressionConfig.scoring`` picks GQA-native (default), published or kvpress scores for H2O/TOVA (the
table is in ``policies``). Quantized storage: ``init_quantized`` + ``quantized_step`` (same arguments).
Uncompressed caches use ``append`` + ``attend`` directly; ``attend_selected`` is the query-aware
block-selection read of a cache; ``SelectiveCache`` + ``selective_step`` decode over the top blocks with an
index carried between steps. ``compress_prompt`` streams a prompt's k/v into a budget-sized cache (the
one-pass prefill); ``snapkv_once`` is SnapKV's single compression of a whole prompt, without streaming.
Per-head budgets with real memory savings: ``HeadClasses`` (kv heads grouped into budget classes, one cache
per class) + ``grouped_step``.
"""

from selmerge_jax.kvcache.cache import (
    KVCache,
    append,
    attend,
    attend_segments,
    attend_slots,
    gather_slots,
    init_cache,
    kv_nbytes,
    nbytes,
    num_valid,
    valid_mask,
    with_capacity,
)
from selmerge_jax.kvcache.config import KVCompressionConfig
from selmerge_jax.kvcache.head_classes import (
    HeadClasses,
    assign_classes,
    grouped_step,
    init_grouped,
    retrieval_scores,
)
from selmerge_jax.kvcache.policies import (
    compress,
    init_for,
    make_room,
    needs_probs,
    observe,
    slot_scores,
    step,
)
from selmerge_jax.kvcache.prefill import (
    KEY_CHUNK,
    chunked_prefill,
    compress_prompt,
    left_pad,
    one_shot,
    scan_chunks,
    scored_rows,
    snapkv_once,
)
from selmerge_jax.kvcache.quant import QuantizedKVCache, init_quantized, quantized_step
from selmerge_jax.kvcache.query_select import attend_selected, region_summaries, select_blocks
from selmerge_jax.kvcache.selective import DecodeSelection, SelectiveCache, init_selective, selective_step

__all__ = [
    "DecodeSelection",
    "SelectiveCache",
    "HeadClasses",
    "KVCache",
    "KVCompressionConfig",
    "QuantizedKVCache",
    "append",
    "assign_classes",
    "attend",
    "attend_segments",
    "attend_selected",
    "attend_slots",
    "chunked_prefill",
    "compress",
    "KEY_CHUNK",
    "compress_prompt",
    "gather_slots",
    "grouped_step",
    "init_cache",
    "init_for",
    "init_grouped",
    "init_quantized",
    "init_selective",
    "kv_nbytes",
    "left_pad",
    "make_room",
    "nbytes",
    "needs_probs",
    "num_valid",
    "observe",
    "quantized_step",
    "region_summaries",
    "retrieval_scores",
    "scan_chunks",
    "scored_rows",
    "select_blocks",
    "selective_step",
    "slot_scores",
    "one_shot",
    "snapkv_once",
    "step",
    "valid_mask",
    "with_capacity",
]
