"""The one shape-letter glossary of selmerge_jax, and jaxtyping aliases built from it.

Every signature, einsum string and end-of-line shape comment in the package uses these letters:

====  ===========================================================================
 B    batch
 T    query length (tokens)
 S    key/value length (tokens)
 N    query heads
 K    key/value heads
 G    query heads per kv head, G = N / K
 H    head dim (of q and k, and of v unless Hv says otherwise)
 Hv   value head dim where it differs from H (MLA-style; outputs are then ``[B, T, N, Hv]``)
 D    model width
 W    block (region) size in tokens
 R    regions, R = T / W
 Q    query groups: `merge` consecutive query regions that share one KV selection
 P    selection heads: N (one selection per query head) or K (one per kv head)
 M    selected KV regions per query group (not counting the local block)
 V    vocab size
 L    layers
 C    cache slots (KV-cache capacity)
====  ===========================================================================

Attention tensors are ``[B, T, N, H]`` for q and ``[B, S, K, H]`` for k/v, as in
``jax.nn.dot_product_attention``.
"""

from jaxtyping import Array, Bool, Float, Int

__all__ = ["Array", "Bool", "Float", "Int", "QArray", "KVArray", "PlanIndices"]

QArray = Float[Array, "B T N H"]
KVArray = Float[Array, "B S K H"]
PlanIndices = Int[Array, "B P Q M"]
