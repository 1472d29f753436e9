"""The pure-jnp oracle of selective decode attention and the input checks.

Shapes (``selmerge_jax.typing`` letters; C = cache slots, M = selected blocks, W = slots per block):

* ``q [B, K, G, H]``: one query per head, its N = K * G heads grouped by kv head (a decode step, T = 1);
* ``k``, ``v [B, K, C, H]``: the cache's slots; ``pos int32 [B, K, C]`` (-1 empty),
  ``count float32 [B, K, C]`` (0 empty, n > 1 a merged slot: ``log(n)`` is added to its logit);
* ``blocks int32 [B, K, M]``: the blocks of W slots each (row, kv head) attends, entries in ``[0, C / W)``;
* ``q_pos int32 [B]``: the query's position; a slot is seen iff ``0 <= pos <= q_pos`` and ``count > 0``;
* ``centroids`` (optional) ``(ck, cv, cpos, ccount)``, ``[B, K, R', H]`` / ``[B, K, R']``: one merged
  token per block, row ``r`` standing for block ``r`` (an index pads the rows past the last block with
  ``ccount`` 0). Every row whose block is not in ``blocks`` joins the same softmax as one more slot
  (``log(ccount)`` on its logit, seen by the same rule), so the output is the select-and-merge step's: the
  selected blocks exactly, the others through their centroids.

Returns ``out float32 [B, K, G, H]`` (normalised over the selected slots and the centroids; 0 where nothing
is seen) and ``lse float32 [B, K, G]`` (natural log, ``-inf`` where nothing is seen), so a caller can merge
further slots into the same softmax.
"""

from __future__ import annotations

import jax.numpy as jnp

from selmerge_jax.validation import fail


def check_decode_inputs(q, k, v, pos, count, blocks, q_pos, block: int, centroids=None) -> None:
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
    if centroids is not None:
        if len(centroids) != 4:
            fail("centroids", f"a tuple of {len(centroids)}", "(ck, cv, cpos, ccount)")
        ck, cv, cpos, ccount = centroids
        if ck.ndim != 4 or ck.shape[:2] != (b, kh) or ck.shape[3] != h or jnp.shape(cv) != ck.shape:
            fail("centroids (ck, cv)", (ck.shape, jnp.shape(cv)),
                 f"[B={b}, K={kh}, R', H={h}], both the same")
        if jnp.shape(cpos) != ck.shape[:3] or jnp.shape(ccount) != ck.shape[:3]:
            fail("centroids (cpos, ccount)", (jnp.shape(cpos), jnp.shape(ccount)), f"{ck.shape[:3]}")
        if ck.shape[2] < c // block:
            fail("centroids rows", ck.shape[2], f">= the number of blocks C / block = {c // block}")
        # the tuple is ordered as a cache's slots (pos before count), not as a BlockIndex (n before newest):
        # swapped, both would convert silently
        if not jnp.issubdtype(jnp.asarray(cpos).dtype, jnp.integer):
            fail("centroids cpos.dtype", jnp.asarray(cpos).dtype, "an integer dtype (positions)")
        if not jnp.issubdtype(jnp.asarray(ccount).dtype, jnp.floating):
            fail("centroids ccount.dtype", jnp.asarray(ccount).dtype, "a float dtype (counts)")
    for name, x, kind in (("q", q, jnp.floating), ("k", k, jnp.floating), ("count", count, jnp.floating),
                          ("pos", pos, jnp.integer), ("blocks", blocks, jnp.integer),
                          ("q_pos", q_pos, jnp.integer)):
        if not jnp.issubdtype(jnp.asarray(x).dtype, kind):
            fail(f"{name}.dtype", jnp.asarray(x).dtype, "a float dtype" if kind is jnp.floating
                 else "an integer dtype")


def selective_decode_reference(q, k, v, pos, count, blocks, q_pos, *, block: int, scale: float | None = None,
                               centroids=None):
    """Gathers the selected blocks' slots (and the centroids of the others) and runs one float32 softmax over
    them (module docstring)."""
    check_decode_inputs(q, k, v, pos, count, blocks, q_pos, block, centroids)
    h = q.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    slots = (blocks[..., None] * block + jnp.arange(block)).reshape(*blocks.shape[:2], -1)  # [B, K, M*W]
    take = lambda x: jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 3)), axis=2)
    ks, vs, ps, cs = take(k), take(v), take(pos), take(count).astype(jnp.float32)
    if centroids is not None:
        ck, cv, cpos, ccount = centroids
        chosen = (jnp.arange(ck.shape[2])[:, None] == blocks[:, :, None, :]).any(-1)  # [B, K, R']
        ccount = jnp.where(chosen, 0.0, ccount.astype(jnp.float32))
        join = lambda a, c: jnp.concatenate([a, c.astype(a.dtype)], axis=2)
        ks, vs, ps, cs = join(ks, ck), join(vs, cv), join(ps, cpos), join(cs, ccount)
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
