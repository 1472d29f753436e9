"""Dense attention: the oracle for everything else in the package (materialises the full [T, S] logits)."""

import math

import jax.numpy as jnp

from selmerge_jax.validation import check_value_shape

__all__ = ["check_qkv", "dense_attention"]


def check_qkv(q, k, v, *, value_dim: bool = False) -> tuple[int, int]:
    """Validates q ``[B, T, N, H]`` and k/v ``[B, S, K, H]``; returns ``(K, G)`` with ``G = N / K``.

    ``value_dim``: the caller also takes v ``[B, S, K, Hv]`` with its own head dim (MLA-style attention, where
    queries and keys are wider than values); otherwise v must have k's shape.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be rank 4 ([B, T, N, H] / [B, S, K, H]), got shape {jnp.shape(x)}")
    check_value_shape(k, v, value_dim)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    b, _, n, h = q.shape
    bk, _, kh, hk = k.shape
    if bk != b:
        raise ValueError(f"q batch {b} != k batch {bk}")
    if hk != h:
        raise ValueError(f"q head dim {h} != k head dim {hk}")
    if kh <= 0 or n % kh:
        raise ValueError(f"query heads N={n} must be a positive multiple of kv heads K={kh}")
    return kh, n // kh


def dense_attention(q, k, v, *, causal: bool = True, segment_ids=None, scale: float | None = None,
                    return_lse: bool = False):
    """Softmax attention of q ``[B, T, N, H]`` over k ``[B, S, K, H]`` and v ``[B, S, K, Hv]`` (GQA; values
    may have their own head dim), float32 accumulation.

    Args:
      causal: query i sees keys j <= i + (S - T) (bottom-right aligned, so T < S means "the last T queries").
      segment_ids: optional ``int [B, T]`` (requires T == S); tokens attend only within their segment.
      scale: softmax scale, default ``1/sqrt(H)``.
      return_lse: also return the float32 log-sum-exp ``[B, T, N]`` (``-inf`` for fully masked rows).

    Returns:
      ``[B, T, N, Hv]`` in q's dtype; fully masked rows give 0, never NaN.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    kv_heads, g = check_qkv(q, k, v, value_dim=True)
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qg = q.reshape(b, t, kv_heads, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = _mask(t, s, causal, segment_ids)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgts,bskh->bkgth", p, v.astype(jnp.float32)) / jnp.where(denom == 0, 1.0, denom)
    out = out.transpose(0, 3, 1, 2, 4)
    out = out.reshape(b, t, n, v.shape[3]).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)  # [B, K, G, T]
    return out, lse.transpose(0, 3, 1, 2).reshape(b, t, n)


def _mask(t: int, s: int, causal: bool, segment_ids):
    """``bool [B|1, 1, 1, T, S]`` or None."""
    mask = None
    if causal:
        mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None, None]
    if segment_ids is not None:
        if t != s:
            raise ValueError(f"segment_ids need T == S, got T={t}, S={s}")
        if segment_ids.shape[-1] != t or segment_ids.ndim != 2:
            raise ValueError(f"segment_ids must be [B, T={t}], got shape {segment_ids.shape}")
        seg = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
        mask = seg if mask is None else mask & seg
    return mask
