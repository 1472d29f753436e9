"""Per-head budget classes: real memory savings, exact equivalence with equal budgets, calibration ranking."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.kvcache import cache as kc
from selmerge_jax.kvcache import head_classes as hc
from selmerge_jax.kvcache import policies as kp
from selmerge_jax.kvcache.config import KVCompressionConfig

B, K, G, H = 1, 4, 2, 8
N = K * G
CONFIG = KVCompressionConfig(policy="h2o", budget=8, slack=4, sink=1, window=2)


def _data(n, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, n, N, H)), jax.random.normal(ks[1], (B, n, K, H)),
            jax.random.normal(ks[2], (B, n, K, H)))


def _run_grouped(classes, n, seed=0):
    q, k, v = _data(n, seed)
    caches = hc.init_grouped(CONFIG, classes, B, H, jnp.float32)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(c, *a):
        return hc.grouped_step(c, classes, CONFIG, *a)

    outs = []
    for i in range(n):
        o, caches = step(caches, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], jnp.full((B, 1), i))
        outs.append(o)
    return jnp.concatenate(outs, 1), caches


def test_equal_budgets_match_one_ungrouped_cache():
    n = 30
    got, caches = _run_grouped(hc.HeadClasses(heads=((0, 3), (1, 2)), budgets=(8, 8)), n)
    q, k, v = _data(n)
    cache = kp.init_for(CONFIG, B, K, 12, H, jnp.float32)
    step = jax.jit(lambda c, *a: kp.step(c, CONFIG, *a, budget=8))
    ref = []
    for i in range(n):
        o, cache = step(cache, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], jnp.full((B, 1), i))
        ref.append(o)
    np.testing.assert_allclose(got, jnp.concatenate(ref, 1), rtol=1e-6, atol=1e-6)
    kept = lambda c, j: sorted(np.asarray(c.pos[0, j])[np.asarray(c.pos[0, j]) >= 0].tolist())
    assert kept(caches[0], 1) == kept(cache, 3) and kept(caches[1], 0) == kept(cache, 1)


def test_unequal_budgets_save_memory_and_keep_more_where_budgeted():
    classes = hc.HeadClasses(heads=((2,), (0, 1, 3)), budgets=(16, 4))
    _, caches = _run_grouped(classes, 40, seed=1)
    assert caches[0].k.shape == (B, 1, 20, H) and caches[1].k.shape == (B, 3, 8, H)
    assert classes.slots(CONFIG.slack) == 1 * 20 + 3 * 8
    per_slot = 2 * H * 4 + 3 * 4  # K and V float32, pos/count/score
    assert kc.nbytes(caches) == B * classes.slots(CONFIG.slack) * per_slot + 2 * (4 + 4)  # + length, dropped
    uniform = kp.init_for(CONFIG, B, K, 20, H, jnp.float32)  # every head at the large budget
    assert kc.nbytes(caches) < 0.6 * kc.nbytes(uniform)  # 44 slots instead of 4 x 20 = 80
    assert int(kc.num_valid(caches[0]).min()) >= 16 and int(kc.num_valid(caches[1]).max()) <= 8


def test_retrieval_scores_rank_far_looking_heads_first():
    c, t = 12, 2
    pos = jnp.broadcast_to(jnp.arange(c), (B, K, c))
    qpos = jnp.array([[10, 11]])
    probs = jnp.zeros((B, K, G, t, c))
    probs = probs.at[:, :, :, 0, 10].set(1.0).at[:, :, :, 1, 11].set(1.0)  # every head local...
    probs = probs.at[:, 2].set(0.0).at[:, 2, :, :, 0].set(1.0)  # ...but head 2 reads the first token
    probs = probs.at[:, 1, :, :, :].multiply(0.5).at[:, 1, :, :, 3].add(0.5)  # head 1: half far
    scores = hc.retrieval_scores(probs, pos, qpos, window=4)
    np.testing.assert_allclose(scores, [0.0, 0.5, 1.0, 0.0])
    classes = hc.assign_classes(scores, sizes=(2, 2), budgets=(64, 8))
    assert classes.heads == ((1, 2), (0, 3)) and classes.budgets == (64, 8)


@pytest.mark.parametrize("heads, budgets, message", [
    (((0, 1), (1, 2)), (4, 4), "partition"),
    (((0,), (1,)), (4,), "2 head classes but 1 budgets"),
    (((0,), (1,)), (4, 0), "budgets"),
])
def test_bad_classes_raise(heads, budgets, message):
    with pytest.raises(ValueError, match=message):
        hc.HeadClasses(heads=heads, budgets=budgets)


def test_assign_classes_needs_sizes_that_cover_every_head():
    with pytest.raises(ValueError, match="add up"):
        hc.assign_classes(np.zeros(4), sizes=(1, 2), budgets=(8, 4))


@pytest.mark.parametrize("change, message", [
    ({"window": 0}, "window=0: must be a positive int"),
    ({"pos": jnp.zeros((B, K, 1), jnp.int32)}, "pos"),  # would broadcast over every slot
    ({"q_positions": jnp.zeros((B, 1), jnp.int32)}, "q_positions must be"),
])
def test_retrieval_scores_bad_inputs_raise(change, message):
    c, t = 6, 2
    args = {"probs": jnp.zeros((B, K, G, t, c)), "pos": jnp.zeros((B, K, c), jnp.int32),
            "q_positions": jnp.zeros((B, t), jnp.int32), "window": 2, **change}
    with pytest.raises(ValueError, match=message):
        hc.retrieval_scores(**args)


def test_assign_classes_rejects_nan_scores():
    with pytest.raises(ValueError, match="scores must be finite"):
        hc.assign_classes(np.array([0.1, np.nan, 0.3, 0.2]), sizes=(2, 2), budgets=(8, 4))
