"""The policies against their published / kvpress semantics, computed independently in numpy on the full
prompt.

SnapKV (kvpress SnapKVPress): the last w queries attend over all keys (causal inside the window); the window's
columns are dropped; mean over the window queries, avg_pool1d(kernel, padding=kernel // 2) along the other
keys, mean over the query heads of each kv group; top-k, window always kept. TOVA (TOVAPress / the paper): the
last query's attention averaged over every head of the layer. H2O (ObservedAttentionPress with
scoring="kvpress"): attention received / number of queries that saw the key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.kvcache import policies as kp
from selmerge_jax.kvcache import prefill as kpre
from selmerge_jax.kvcache.config import KVCompressionConfig

K, G, H = 2, 2, 16
N = K * G


def _probs(q, k):
    """Causal softmax ``[N, T, S]`` of q ``[T, N, H]`` (the last T of S positions) over k ``[S, K, H]``."""
    t, s = q.shape[0], k.shape[0]
    logits = np.einsum("tnh,snh->nts", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), G, 1))
    logits /= np.sqrt(H)
    causal = np.arange(s)[None, :] <= (s - t + np.arange(t))[:, None]
    logits = np.where(causal, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _avg_pool1d(x, kernel):
    pad = kernel // 2
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    return np.stack([xp[..., i:i + x.shape[-1]] for i in range(kernel)]).sum(0) / kernel


def _top(scores, n):
    return set(np.argsort(-scores, kind="stable")[:n].tolist())


def snapkv_reference(q, k, w, kernel, budget):
    """kvpress SnapKVPress on one prompt: q ``[S, N, H]``, k ``[S, K, H]`` -> kept positions per kv head."""
    s = k.shape[0]
    attn = _probs(q[-w:], k)[..., :s - w]  # [N, w, S - w]: window columns dropped after the softmax
    scores = _avg_pool1d(attn.mean(1), kernel).reshape(K, G, s - w).mean(1)
    return [sorted(_top(scores[h], budget - w) | set(range(s - w, s))) for h in range(K)]


def _kept(cache, b=0):
    return [sorted(p for p in np.asarray(cache.pos[b, h]).tolist() if p >= 0) for h in range(K)]


def _prefill(config, q, k, v, positions, *, chunk, budget):
    s = positions.shape[1]
    capacity = s + (-s % chunk) + chunk  # the whole padded prompt fits: no compression before `finish`
    cache = kp.init_for(config, q.shape[0], K, capacity, H, jnp.float32)
    run = jax.jit(lambda c, q, k, v,
                  p: kpre.chunked_prefill(c, config, q, k, v, p, chunk=chunk, budget=budget))
    return run(cache, q, k, v, positions)


def _data(s, seed, batch=1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (2.0 * jax.random.normal(ks[0], (batch, s, N, H)), jax.random.normal(ks[1], (batch, s, K, H)),
            jax.random.normal(ks[2], (batch, s, K, H)))


S, W, KERNEL, BUDGET = 18, 8, 5, 12
SNAP = KVCompressionConfig(policy="snapkv", budget=BUDGET, sink=0, window=0, obs_window=W, pool_kernel=KERNEL)


@pytest.mark.parametrize("chunk", [1, 4, 6, 18, 32], ids=lambda c: f"chunk{c}")
def test_snapkv_equals_kvpress_whatever_the_chunk_size(chunk):
    """1 (decode-like steps), 4 (does not divide S), S/3 (< the window), S, and a chunk larger than the
    prompt."""
    q, k, v = _data(S, seed=0)
    want = snapkv_reference(q[0], k[0], W, KERNEL, BUDGET)
    _, cache = _prefill(SNAP, q, k, v, jnp.arange(S)[None], chunk=chunk, budget=BUDGET)
    assert _kept(cache) == want
    assert int(cache.length) == BUDGET and int(cache.dropped) == 0


def test_snapkv_window_columns_lend_no_votes_to_their_neighbours():
    """The window attends mostly to itself and somewhat to key 3. Pooled over the window columns, key 11 (next
    to the window) would outvote key 3's neighbours; with the columns dropped, key 3 and its neighbours are
    kept."""
    s, w = 16, 4
    keys = jnp.broadcast_to(jnp.eye(H)[None, :, None], (1, s, K, H))  # key i = e_i
    qw = 24.0 * jnp.eye(H)[12:16].sum(0) + 20.0 * jnp.eye(H)[3]
    q = jnp.zeros((1, s, N, H)).at[:, -w:].set(qw)
    config = KVCompressionConfig(policy="snapkv", budget=7, sink=0, window=0, obs_window=w, pool_kernel=3)
    want = snapkv_reference(q[0], keys[0], w, 3, 7)
    assert want == [[2, 3, 4, 12, 13, 14, 15]] * K
    _, cache = _prefill(config, q, keys, keys, jnp.arange(s)[None], chunk=s, budget=7)
    assert _kept(cache) == want


def test_snapkv_padding_rows_never_vote():
    """Right-padded prompts (the last chunk mostly padding, two rows of different lengths) keep what each
    row's real prompt keeps alone."""
    lengths, total, chunk = (18, 13), 24, 8
    q, k, v = _data(total, seed=1, batch=2)
    pos = jnp.where(jnp.arange(total)[None] < jnp.array(lengths)[:, None], jnp.arange(total)[None], -1)
    _, cache = _prefill(SNAP, q, k, v, pos, chunk=chunk, budget=BUDGET)
    for b, n in enumerate(lengths):
        assert _kept(cache, b) == snapkv_reference(q[b, :n], k[b, :n], W, KERNEL, BUDGET), b


def tova_reference(q, k, budget, shared):
    """The last query's attention (its own column excluded, the token kept): per kv head or averaged over
    all."""
    s = k.shape[0]
    attn = _probs(q[-1:], k)[:, 0, :s - 1]  # [N, S - 1]
    scores = [attn.mean(0)] * K if shared else list(attn.reshape(K, G, s - 1).sum(1))
    return [sorted(_top(sc, budget - 1) | {s - 1}) for sc in scores]


@pytest.mark.parametrize("scoring", ["gqa", "published", "kvpress"])
def test_tova_per_kv_head_or_one_set_per_layer(scoring):
    s = 12
    keys = jnp.broadcast_to(jnp.eye(H)[None, :s, None], (1, s, K, H))
    # kv head 0 -> key 3, 1 -> key 5
    last = jnp.stack([20.0 * jnp.eye(H)[3]] * G + [12.0 * jnp.eye(H)[5]] * G)
    q = jnp.zeros((1, s, N, H)).at[:, -1].set(last)
    config = KVCompressionConfig(policy="tova", scoring=scoring, budget=2, sink=0, window=1)
    _, cache = _prefill(config, q, keys, keys, jnp.arange(s)[None], chunk=4, budget=2)
    want = tova_reference(q[0], keys[0], 2, shared=scoring != "gqa")
    assert _kept(cache) == want
    assert want == ([[3, 11], [5, 11]] if scoring == "gqa" else [[3, 11], [3, 11]])


def h2o_reference(q, k, budget, window, normalised):
    s = k.shape[0]
    received = _probs(q, k).sum(1)  # [N, S]: summed over every query
    if normalised:  # ObservedAttentionPress: / the number of queries that saw the key, mean over the group
        received = received / np.arange(s, 0, -1)
    scores = received.reshape(K, G, s).mean(1)[:, :s - window]
    return [sorted(_top(scores[h], budget - window) | set(range(s - window, s))) for h in range(K)]


@pytest.mark.parametrize("scoring", ["gqa", "published", "kvpress"])
def test_h2o_sum_or_kvpress_average(scoring):
    s, budget, window = 16, 6, 2
    q, k, v = _data(s, seed=3)
    config = KVCompressionConfig(policy="h2o", scoring=scoring, budget=budget, sink=0, window=window)
    _, cache = _prefill(config, q, k, v, jnp.arange(s)[None], chunk=4, budget=budget)
    summed, averaged = (h2o_reference(q[0], k[0], budget, window, norm) for norm in (False, True))
    assert summed != averaged  # the inputs tell the two variants apart
    assert _kept(cache) == (averaged if scoring == "kvpress" else summed)


@pytest.mark.parametrize("kw, match", [
    ({"policy": "h2o", "budget": 8, "scoring": "paper"}, "scoring='paper': must be one of"),
    ({"policy": "snapkv", "budget": 20, "window": 4, "obs_window": 32}, "obs_window=32"),
])
def test_bad_configs_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        KVCompressionConfig(**kw)


def test_prefill_bad_inputs_name_the_value():
    q, k, v = _data(8, seed=4)
    pos = jnp.arange(8)[None]
    cache = kp.init_for(SNAP, 1, K, 32, H, jnp.float32)
    with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
        kpre.chunked_prefill(cache, SNAP, q, k, v, pos, chunk=0, budget=BUDGET)
    with pytest.raises(ValueError, match="incoming T=24"):
        kpre.chunked_prefill(cache, SNAP, q, k, v, pos, chunk=24, budget=BUDGET)
    none = KVCompressionConfig(policy="none")
    with pytest.raises(ValueError, match=r"S=8 tokens .* capacity C=6"):
        kpre.chunked_prefill(kp.init_for(none, 1, K, 6, H, jnp.float32), none, q, k, v, pos, chunk=2,
                             budget=6)
    with pytest.raises(ValueError, match="positions"):
        kp.observe(cache, jnp.zeros((1, K, G, 8, 32)), SNAP)
