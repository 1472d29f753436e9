"""The pure-jnp oracle of selective decode attention and the input checks.

Shapes (``selmerge_jax.typing`` letters; C = cache slots, M = selected blocks, W = slots per block):

* ``q [B, K, G, H]``: one query per head, its N = K * G heads grouped by kv head (a decode step, T = 1);
* ``k``, ``v [B, K, C, H]``: the cache's slots; ``pos int32 [B, K, C]`` (-1 empty),
  ``count float32 [B, K, C]`` (0 empty, n > 1 a merged slot: ``log(n)`` is added to its logit);
* ``blocks int32 [B, K, M]``: the blocks of W slots each (row, kv head) attends, entries in ``[0, C / W)``;
* ``q_pos int32 [B]``: the query's position; a slot is seen iff ``0 <= pos <= q_pos`` and ``count > 0``.

Returns ``out float32 [B, K, G, H]`` (normalised over the selected slots; 0 where nothing is seen) and
``lse float32 [B, K, G]`` (natural log, ``-inf`` where nothing is seen), so a caller can merge further slots
(the centroids of the other blocks) into the same softmax.
"""

from __future__ import annotations

import jax.numpy as jnp

from selmerge_jax.validation import fail


def check_decode_inputs(q, k, v, pos, count, blocks, q_pos, block: int) -> None:
    """Shape errors named by argument (a wrong shape under jit would gather the wrong slots silently)."""
    if q.ndim != 4 or k.ndim != 4:
        fail("q / k", (q.shape, k.shape), "q [B, K, G, H] and k [B, K, C, H]")
    b, kh, _, h = q.shape
    if k.shape[:2] != (b, kh) or k.shape[3] != h or v.shape != k.shape:
        fail("k / v", (k.shape, v.shape), f"[B={b}, K={kh}, C, H={h}], both the same")
    c = k.shape[2]
    if not isinstance(block, int) or block <= 0 or c % block:
        fail("block", block, f"a positive divisor of the cache slots C={c}")
    if pos.shape != k.shape[:3] or count.shape != k.shape[:3]:
        fail("pos / count", (pos.shape, count.shape), f"{k.shape[:3]}")
    if blocks.ndim != 3 or blocks.shape[:2] != (b, kh):
        fail("blocks", blocks.shape, f"[B={b}, K={kh}, M]")
    if jnp.shape(q_pos) != (b,):
        fail("q_pos", jnp.shape(q_pos), f"[B={b}]")
    for name, x, kind in (("q", q, jnp.floating), ("k", k, jnp.floating), ("count", count, jnp.floating),
                          ("pos", pos, jnp.integer), ("blocks", blocks, jnp.integer),
                          ("q_pos", q_pos, jnp.integer)):
        if not jnp.issubdtype(jnp.asarray(x).dtype, kind):
            fail(f"{name}.dtype", jnp.asarray(x).dtype, "a float dtype" if kind is jnp.floating
                 else "an integer dtype")


def selective_decode_reference(q, k, v, pos, count, blocks, q_pos, *, block: int, scale: float | None = None):
    """Gathers the selected blocks' slots and runs one float32 softmax over them (module docstring)."""
    check_decode_inputs(q, k, v, pos, count, blocks, q_pos, block)
    h = q.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    slots = (blocks[..., None] * block + jnp.arange(block)).reshape(*blocks.shape[:2], -1)  # [B, K, M*W]
    take = lambda x: jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 3)), axis=2)
    ks, vs, ps, cs = take(k), take(v), take(pos), take(count)
    logits = jnp.einsum("bkgh,bkch->bkgc", q, ks.astype(q.dtype), preferred_element_type=jnp.float32)
    logits = logits * scale + jnp.log(jnp.maximum(cs, 1e-30))[:, :, None]
    seen = (ps >= 0) & (cs > 0) & (ps <= jnp.asarray(q_pos, jnp.int32)[:, None, None])
    logits = jnp.where(seen[:, :, None], logits, -jnp.inf)
    m = jnp.max(logits, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = p.sum(-1)
    vs = jnp.where(seen[..., None], vs.astype(jnp.float32), 0.0)  # an empty slot's V may be NaN
    out = jnp.einsum("bkgc,bkch->bkgh", p, vs) / jnp.where(denom == 0, 1.0, denom)[..., None]
    lse = jnp.where(denom > 0, m[..., 0] + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
    return out, lse
