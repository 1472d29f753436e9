"""Acceptance on a tiny float32 Llama: a budget that keeps every token reproduces uncompressed generation exactly,
even when compressions fire (they only drop padding slots), and a tight budget generates within its memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax import kvcache
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.models import Llama, preset
from selmerge_jax.models.generate import generate, prefill

PROMPT, REAL, CHUNK, NEW = 24, 16, 4, 8  # 8 right-padding slots per row: compressions have something to drop


@dataclasses.dataclass(frozen=True)
class Step:
    """The ``cache_fn`` hook generate calls per layer; frozen, so it hashes by value (a static jit argument)."""

    config: KVCompressionConfig
    budget: int

    def __call__(self, cache, q, k, v, positions, *, window=None):
        return kvcache.step(cache, self.config, q, k, v, positions, budget=self.budget)


@pytest.fixture(scope="module")
def tiny():
    model = Llama(preset("tiny", num_layers=1), rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.PRNGKey(1), (2, PROMPT), 3, 259)
    return model, prompts


def _caches(model, config, budget, batch=2):
    cfg = model.config
    return tuple(kvcache.init_for(config, batch, cfg.num_kv_heads, budget + config.slack, cfg.head_size,
                                  jnp.float32) for _ in range(cfg.num_layers))


@pytest.mark.parametrize("kw", [{"policy": "h2o", "merge": "nearest"},
                                {"policy": "snapkv", "merge": "centroid", "merge_slots": 1}], ids=["h2o", "snapkv"])
def test_budget_that_keeps_everything_reproduces_generation(tiny, kw):
    model, prompts = tiny
    lengths = jnp.array([REAL, REAL])
    config = KVCompressionConfig(budget=REAL + NEW - 1 + kw.get("merge_slots", 0), slack=CHUNK, sink=1, window=2,
                                 pool_kernel=3, **kw)
    ref = generate(model, prompts, max_new_tokens=NEW, lengths=lengths, chunk_size=CHUNK, eos_ids=(),
                   return_logits=True)
    got = generate(model, prompts, max_new_tokens=NEW, lengths=lengths, chunk_size=CHUNK, eos_ids=(),
                   return_logits=True, caches=_caches(model, config, config.budget),
                   cache_fn=Step(config, config.budget))
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_prefill_compresses_padding_away_and_a_tight_budget_stays_bounded(tiny):
    model, prompts = tiny
    config = KVCompressionConfig(policy="tova", budget=8, slack=CHUNK, sink=1, window=2)
    _, caches = prefill(model, prompts, _caches(model, config, 8), lengths=jnp.array([REAL, REAL]),
                        chunk_size=CHUNK, cache_fn=Step(config, 8))
    cache = caches[0]
    assert cache.capacity == 8 + CHUNK and int(cache.dropped) == 0
    assert int(kvcache.num_valid(cache).max()) <= 8 + CHUNK
    assert bool((cache.pos < REAL).all())  # padding (position -1) never counts as a token
    kept = np.asarray(cache.pos[0, 0])
    assert 0 in kept and REAL - 1 in kept  # the sink and the newest real token survive
