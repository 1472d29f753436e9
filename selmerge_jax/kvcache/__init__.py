"""KV-cache compression for long-context inference: a static-shape GQA-native cache pytree and policies.

Typical per-layer use inside a jitted decode step (see ``policies.step``)::

    config = KVCompressionConfig(policy="snapkv", ratio=0.1)
    budget = config.budget_for(prompt_len)
    cache = init_for(config, B, K, config.capacity_for(prompt_len), H, jnp.bfloat16)
    out, cache = step(cache, config, q, k, v, positions, budget=budget)
"""

from selmerge_jax.kvcache.cache import (
    KVCache,
    append,
    attend,
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
from selmerge_jax.kvcache.quant import QuantizedKVCache, init_quantized, quantized_step
from selmerge_jax.kvcache.policies import compress, init_for, make_room, needs_probs, observe, slot_scores, step

__all__ = [
    "KVCache",
    "KVCompressionConfig",
    "QuantizedKVCache",
    "append",
    "attend",
    "attend_slots",
    "compress",
    "gather_slots",
    "init_cache",
    "init_for",
    "init_quantized",
    "kv_nbytes",
    "make_room",
    "nbytes",
    "needs_probs",
    "num_valid",
    "observe",
    "quantized_step",
    "slot_scores",
    "step",
    "valid_mask",
    "with_capacity",
]
