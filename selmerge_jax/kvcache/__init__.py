"""KV-cache compression for long-context inference: a static-shape GQA-native cache pytree and policies."""

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

__all__ = [
    "KVCache",
    "append",
    "attend",
    "attend_slots",
    "gather_slots",
    "init_cache",
    "kv_nbytes",
    "nbytes",
    "num_valid",
    "valid_mask",
    "with_capacity",
]
