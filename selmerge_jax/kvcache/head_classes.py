"""Per-head adaptive budgets that really save memory: a layer's kv heads grouped into budget classes.

Per-head budgets inside one ``[B, K, C, H]`` array save nothing (every head still holds C slots: the trap of
AdaKV-style masks). Here each class is its own :class:`KVCache` ``[B, K_c, C_c, H]``, so a layer holds
``sum_c K_c * C_c`` slots per batch row instead of ``K * max_c C_c``. Shapes stay static: the class sizes and
budgets are Python ints fixed before decoding; which head goes to which class is decided once, from a
calibration statistic measured on real attention (:func:`retrieval_scores`: the attention mass a head puts
outside its recent window; heads that look far back get the large budget, local heads the small one).

Every policy scores and compresses each kv head independently, so a grouped cache with equal budgets behaves
exactly like one ungrouped cache; the classes only change how many slots each head keeps.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np

from selmerge_jax.kvcache import policies
from selmerge_jax.kvcache.cache import KVCache
from selmerge_jax.kvcache.config import KVCompressionConfig
from selmerge_jax.validation import check_positive_int, fail, is_int

__all__ = ["HeadClasses", "assign_classes", "grouped_step", "init_grouped", "retrieval_scores"]


def _int_tuple(name: str, value, lo: int) -> tuple[int, ...]:
    items = tuple(value)
    if not items or any(not is_int(x) or x < lo for x in items):
        fail(f"HeadClasses.{name}", value, f"a non-empty sequence of ints >= {lo}")
    return tuple(int(x) for x in items)


@dataclasses.dataclass(frozen=True)
class HeadClasses:
    """A static partition of a layer's kv heads into classes, each with its own budget (slots per head).

    Attributes:
      heads: the kv heads of each class, e.g. ``((0, 5), (1, 2, 3, 4, 6, 7))``; together exactly ``range(K)``.
      budgets: one budget per class.
    """

    heads: tuple[tuple[int, ...], ...]
    budgets: tuple[int, ...]

    def __post_init__(self):
        heads = tuple(_int_tuple("heads[i]", h, 0) for h in self.heads)
        budgets = _int_tuple("budgets", self.budgets, 1)
        if len(heads) != len(budgets):
            raise ValueError(f"HeadClasses: {len(heads)} head classes but {len(budgets)} budgets")
        flat = sorted(h for cls in heads for h in cls)
        if flat != list(range(len(flat))):
            raise ValueError("HeadClasses.heads must partition range(K) (each kv head "
                             f"exactly once), got {heads}")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "budgets", budgets)

    @property
    def kv_heads(self) -> int:
        return sum(len(h) for h in self.heads)

    def slots(self, slack: int) -> int:
        """Cache slots per batch row over all classes (what memory is proportional to)."""
        return sum(len(h) * (b + slack) for h, b in zip(self.heads, self.budgets, strict=True))


def retrieval_scores(probs, pos, q_positions, window: int):
    """``float32 [K]``: mean attention mass each kv head puts on slots older than its last ``window``
    positions.

    ``probs float32 [B, K, G, T, C]`` from ``attend(..., return_probs=True)`` on a calibration prompt, ``pos
    [B, K, C]`` the cache's slot positions, ``q_positions [B, T]``. Local heads score near 0, heads that
    retrieve from far back near 1.
    """
    check_positive_int("window", window)  # the recent positions, not counted
    if jnp.ndim(probs) != 5 or jnp.shape(pos) != jnp.shape(probs)[:2] + jnp.shape(probs)[-1:]:
        raise ValueError(f"probs must be [B, K, G, T, C] and pos [B, K, C] of the same B, K, C; got probs "
                         f"{jnp.shape(probs)}, pos {jnp.shape(pos)}")
    b, _, _, t, _ = jnp.shape(probs)
    if jnp.shape(q_positions) != (b, t):
        raise ValueError(f"q_positions must be [B={b}, T={t}] (the queries of probs), got "
                         f"{jnp.shape(q_positions)}")
    qp = jnp.asarray(q_positions, jnp.int32)[:, None, :, None]  # [B, 1, T, 1]
    old = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= qp - window)  # [B, K, T, C]
    far = jnp.sum(probs * old[:, :, None], axis=-1)  # [B, K, G, T]
    return far.mean(axis=(0, 2, 3))


def assign_classes(scores, sizes, budgets) -> HeadClasses:
    """Ranks kv heads by ``scores [K]`` (concrete, e.g. :func:`retrieval_scores`) and fills the classes in
    order: the ``sizes[0]`` highest-scoring heads get ``budgets[0]``, the next ``sizes[1]`` ``budgets[1]``...
    Ties keep the lower head first."""
    scores = np.asarray(scores, np.float64)
    if not np.isfinite(scores).all():  # argsort would rank NaN heads silently (last)
        raise ValueError(f"scores must be finite, got {scores}")
    sizes = _int_tuple("sizes", sizes, 1)
    if scores.ndim != 1 or sum(sizes) != scores.shape[0]:
        raise ValueError(f"sizes {sizes} must add up to the number of kv heads K={scores.shape} of scores")
    order = np.argsort(-scores, kind="stable")
    bounds = np.cumsum((0,) + sizes)
    heads = tuple(tuple(sorted(int(h) for h in order[a:b])) for a, b in itertools.pairwise(bounds))
    return HeadClasses(heads=heads, budgets=tuple(budgets))


def init_grouped(config: KVCompressionConfig, classes: HeadClasses, batch: int, head_dim: int, dtype):
    """One empty cache per class: ``[B, K_c, budget_c + config.slack, H]``."""
    return tuple(policies.init_for(config, batch, len(h), b + config.slack, head_dim, dtype)
                 for h, b in zip(classes.heads, classes.budgets, strict=True))


def grouped_step(caches: tuple[KVCache, ...], classes: HeadClasses, config: KVCompressionConfig, q, k, v,
                 positions, *, scale: float | None = None, window: int | None = None):
    """``policies.step`` per class: q ``[B, T, N, H]``, k/v ``[B, T, K, H]`` ->
    ``(out [B, T, N, H], caches)``.

    Each class sees the query heads of its kv heads (GQA groups stay whole) and compresses to its own budget.
    """
    b, t, n, h = q.shape
    kh = classes.kv_heads
    if k.shape[2] != kh or n % kh:
        raise ValueError(f"k has {k.shape[2]} kv heads and q {n} query heads; the classes cover K={kh}")
    if len(caches) != len(classes.heads):
        raise ValueError(f"{len(caches)} caches for {len(classes.heads)} head classes")
    qg = q.reshape(b, t, kh, n // kh, h)
    outs, new = [], []
    for cache, heads, budget in zip(caches, classes.heads, classes.budgets, strict=True):
        idx = np.asarray(heads)
        qc = qg[:, :, idx].reshape(b, t, -1, h)
        out, cache = policies.step(cache, config, qc, k[:, :, idx], v[:, :, idx], positions, budget=budget,
                                   scale=scale, window=window)
        outs.append(out.reshape(b, t, len(heads), -1, h))
        new.append(cache)
    order = np.argsort(np.concatenate([np.asarray(hs) for hs in classes.heads]))  # back to kv-head order
    out = jnp.concatenate(outs, axis=2)[:, :, order]
    return out.reshape(b, t, n, h), tuple(new)

