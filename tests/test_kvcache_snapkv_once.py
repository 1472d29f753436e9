"""``prefill.snapkv_once``: SnapKV's one-shot compression of a whole prompt equals the cache the streaming
machinery leaves when the prompt is one chunk (``chunked_prefill``, or ``compress_prompt`` with a sliding
window), and never builds window probabilities over the whole prompt at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import equations

from selmerge_jax.kvcache import cache as kc
from selmerge_jax.kvcache import policies as kp
from selmerge_jax.kvcache import prefill as kpre
from selmerge_jax.kvcache.config import KVCompressionConfig

K, H, W = 2, 8, 8


def _config(budget, **kw):
    return KVCompressionConfig(**{"policy": "snapkv", "budget": budget, "sink": 2, "window": 4,
                                  "obs_window": W, "pool_kernel": 5, **kw})


def _data(lengths, s, g, seed):
    """Right-padded rows of the given real lengths in arrays of S tokens (padding: position -1)."""
    b = len(lengths)
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = 2.0 * jax.random.normal(ks[0], (b, s, K * g, H))
    k, v = (jax.random.normal(key, (b, s, K, H)) for key in ks[1:])
    pos = jnp.where(jnp.arange(s)[None] < jnp.array(lengths)[:, None], jnp.arange(s)[None], -1)
    return q, k, v, pos


def _once(config, q, k, v, pos, *, budget, dtype=jnp.float32, window=None, key_chunk=16):
    cache = kp.init_for(config, q.shape[0], K, budget + 8, H, dtype)
    run = jax.jit(lambda c, q, k, v, p: kpre.snapkv_once(c, config, q, k, v, p, budget=budget, window=window,
                                                         key_chunk=key_chunk))
    return run(cache, q, k, v, pos)


def _one_chunk(config, q, k, v, pos, *, budget, dtype=jnp.float32, window=None):
    """The streaming path with the whole prompt as one chunk: no compression before the final one."""
    s = q.shape[1]
    cache = kp.init_for(config, q.shape[0], K, budget + s, H, dtype)
    if window is None:  # chunked_prefill has no sliding window; compress_prompt scores the same way with one
        run = lambda c, q, k, v, p: kpre.chunked_prefill(c, config, q, k, v, p, chunk=s, budget=budget)[1]
    else:
        run = lambda c, q, k, v, p: kpre.compress_prompt(c, config, q, k, v, p, chunk=s, budget=budget,
                                                         window=window)
    return jax.jit(run)(cache, q, k, v, pos)


def _assert_same(got, want):
    """Equal on the first ``got.capacity`` slots (the rest of ``want`` is empty); votes up to rounding."""
    c = got.capacity
    assert (np.asarray(want.pos[..., c:]) == -1).all()
    for name in ("pos", "count", "score"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name)[..., :c], err_msg=name)
    for name in ("k", "v"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name)[:, :, :c], err_msg=name)
    np.testing.assert_allclose(got.votes, want.votes[..., :c], rtol=1e-5, atol=1e-7)
    assert int(got.length) == int(want.length) and int(got.dropped) == int(want.dropped) == 0


CASES = {  # lengths, S, G, seed, budget, cache dtype
    "one_row": ((37,), 37, 2, 0, 16, jnp.float32),
    "gqa4_ragged": ((53, 30), 53, 4, 1, 20, jnp.float32),
    "row_below_budget": ((41, 12), 43, 2, 2, 20, jnp.float32),  # row 1 keeps everything (and padding)
    "bf16_cache": ((29, 29), 29, 4, 3, 18, jnp.bfloat16),  # keys rounded to the cache dtype before scoring
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_equals_one_chunk_prefill(case):
    lengths, s, g, seed, budget, dtype = case
    config = _config(budget)
    q, k, v, pos = _data(lengths, s, g, seed)
    want = _one_chunk(config, q, k, v, pos, budget=budget, dtype=dtype)
    assert int(want.length) == budget < s  # the compression fired
    _assert_same(_once(config, q, k, v, pos, budget=budget, dtype=dtype), want)


@pytest.mark.parametrize("s, budget, window", [(61, 18, 12), (30, 16, 4)], ids=["window12", "zero_votes"])
def test_sliding_window_equals_one_chunk_compress_prompt(s, budget, window):
    """zero_votes: the window queries see 5 keys outside the window, so the budget's last slot goes to one of
    the keys voted exactly 0, the lowest as in ``compress`` (budget >= S / 2 would flip ``_keep_best``)."""
    config = _config(budget)
    q, k, v, pos = _data((s, s - 17), s, 2, seed=4)
    want = _one_chunk(config, q, k, v, pos, budget=budget, window=window)
    got = _once(config, q, k, v, pos, budget=budget, window=window)
    _assert_same(got, want)
    unwindowed = _once(config, q, k, v, pos, budget=budget)
    assert not np.array_equal(got.pos, unwindowed.pos)  # the window matters to these inputs


def test_key_chunk_does_not_change_the_result():
    s, budget = 45, 16
    config = _config(budget)
    q, k, v, pos = _data((45, 33), s, 2, seed=5)
    whole = _once(config, q, k, v, pos, budget=budget, key_chunk=s)
    for chunk in (7, 16, 4 * s):  # not dividing S (the last chunk overlaps), larger than S
        _assert_same(_once(config, q, k, v, pos, budget=budget, key_chunk=chunk), whole)


def test_prompt_within_the_budget_is_kept_whole():
    s, budget = 14, 16
    config = _config(budget)
    q, k, v, pos = _data((14, 9), s, 2, seed=6)
    want = _one_chunk(config, q, k, v, pos, budget=budget)
    got = _once(config, q, k, v, pos, budget=budget)
    _assert_same(got, want)
    assert int(got.length) == s and np.asarray(kc.num_valid(got)).tolist() == [[14, 14], [9, 9]]


def test_bad_inputs_name_the_argument():
    config = _config(16)
    q, k, v, pos = _data((20,), 20, 2, seed=7)
    cache = kp.init_for(config, 1, K, 24, H, jnp.float32)
    once = lambda c=cache, cfg=config, q=q, k=k, v=v, p=pos, **kw: kpre.snapkv_once(
        c, cfg, q, k, v, p, **{"budget": 16, **kw})
    h2o = KVCompressionConfig(policy="h2o", budget=16, sink=2, window=4)
    with pytest.raises(ValueError, match=r"KVCompressionConfig\.policy='h2o': must be 'snapkv'"):
        once(c=kp.init_for(h2o, 1, K, 24, H, jnp.float32), cfg=h2o)
    with pytest.raises(ValueError, match=r"cache\.votes=None"):
        once(c=kc.init_cache(1, K, 24, H, jnp.float32))
    with pytest.raises(ValueError, match="budget=16 is larger than the cache capacity C=12"):
        once(c=kp.init_for(config, 1, K, 12, H, jnp.float32))
    nearest = _config(16, merge="nearest")
    with pytest.raises(ValueError, match=r"KVCompressionConfig\.merge='nearest'"):
        once(cfg=nearest)
    summary = _config(20, summary_slots=4)
    with pytest.raises(ValueError, match=r"KVCompressionConfig\.summary_slots=4"):
        once(cfg=summary, c=kp.init_for(summary, 1, K, 24, H, jnp.float32), budget=20)
    with pytest.raises(ValueError, match=r"q=\(1, 20, 3, 8\): must be .* multiple of K=2"):
        once(q=q[:, :, :3])
    with pytest.raises(ValueError, match=r"v=\(1, 19, 2, 8\)"):
        once(v=v[:, :19])
    with pytest.raises(ValueError, match=r"positions=\(1, 19\)"):
        once(p=pos[:, :19])
    with pytest.raises(ValueError, match="key_chunk=0"):
        once(key_chunk=0)
    with pytest.raises(ValueError, match="window=0"):
        once(window=0)


def _largest_intermediate(f, *args) -> int:
    """Elements of the largest value any equation of ``f``'s jaxpr (loop bodies included) produces."""
    jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    return max(int(np.prod(x.aval.shape)) for eqn in equations(jaxpr) for x in eqn.outvars)


def test_window_probabilities_are_never_built_over_the_whole_prompt():
    """With key chunks smaller than S no intermediate has B * N * W * S elements (the window's probabilities
    over the whole prompt): the largest is the window over the cache's C slots (H < W here, so q and k are
    smaller too). With one chunk of S keys there is one: the check can fail."""
    s, g, w, budget = 96, 2, 16, 24
    config = _config(budget, obs_window=w)
    q, k, v, pos = _data((96, 70), s, g, seed=8)
    cache = jax.eval_shape(lambda: kp.init_for(config, 2, K, budget + 8, H, jnp.float32))
    size = lambda chunk: _largest_intermediate(
        lambda c, q, k, v, p: kpre.snapkv_once(c, config, q, k, v, p, budget=budget, key_chunk=chunk),
        cache, q, k, v, pos)
    whole, over_cache = (2 * K * g * w * n for n in (s, budget + 8))
    assert size(16) <= over_cache < whole
    assert size(s) >= whole
