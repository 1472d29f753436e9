"""Acceptance on a tiny float32 Llama: a budget that keeps every token reproduces uncompressed generation
exactly, even when compressions fire (they only drop padding slots), and a tight budget generates within its
memory."""

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
    """The ``cache_fn`` hook generate calls per layer; frozen, so it hashes by value (a static jit
    argument)."""

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
                                {"policy": "snapkv", "merge": "centroid", "merge_slots": 1, "obs_window": 2}],
                         ids=["h2o", "snapkv"])
def test_budget_that_keeps_everything_reproduces_generation(tiny, kw):
    model, prompts = tiny
    lengths = jnp.array([REAL, REAL])
    config = KVCompressionConfig(budget=REAL + NEW - 1 + kw.get("merge_slots", 0), slack=CHUNK, sink=1,
                                 window=2,
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


def test_chunked_prefill_longer_than_the_window_equals_the_windowed_full_forward():
    # Mistral-style window of 6 and a 20-token prompt in chunks of 4: every chunk's early queries must not see
    # keys that only its late queries may see (a per-query window, not one per chunk).
    model = Llama(preset("tiny", num_layers=2, sliding_window=6), rngs=nnx.Rngs(3))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 20), 3, 259)
    full, _ = model.hidden_states(tokens)
    cfg = model.config
    caches = tuple(kvcache.init_cache(2, cfg.num_kv_heads, 20, cfg.head_size, jnp.float32)
                   for _ in range(cfg.num_layers))
    chunks = []
    for s in range(0, 20, 4):
        pos = jnp.broadcast_to(jnp.arange(s, s + 4, dtype=jnp.int32), (2, 4))
        h, caches = model.hidden_states(tokens[:, s:s + 4], pos, caches=caches)
        chunks.append(h)
    np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, rtol=1e-5, atol=1e-5)


def test_window_attend_matches_a_dense_banded_mask():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 4, 8))
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 9, 2, 8)) for i in (1, 2))
    pos = jnp.arange(9, dtype=jnp.int32)[None]
    cache = kvcache.append(kvcache.init_cache(1, 2, 9, 8, jnp.float32), k, v, pos)
    qpos = jnp.arange(4, 9, dtype=jnp.int32)[None]
    got = kvcache.attend(cache, q, qpos, window=3)
    band = (pos[0][None, :] <= qpos[0][:, None]) & (pos[0][None, :] > qpos[0][:, None] - 3)  # [T, S]
    kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, kk) / jnp.sqrt(8.0)
    ref = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(jnp.where(band, logits, -jnp.inf), -1), vv)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="window=0: must be a positive int or None"):
        kvcache.attend(cache, q, qpos, window=0)


def test_a_second_generation_compiles_nothing(tiny, monkeypatch):
    # init_caches and compressed_generate used to jit a fresh lambda per call: every call retraced and
    # recompiled.
    from selmerge_jax.evaluation import fidelity
    from selmerge_jax.models import generate as gen

    traces = []
    # called only while tracing: counts (re)traces of the cache builders
    for name in ("init_cache", "init_for"):
        real = getattr(kvcache, name)
        monkeypatch.setattr(kvcache, name, lambda *a, _real=real, _n=name, **k: traces.append(_n)
                            or _real(*a, **k))
    model, prompts = tiny
    kv = KVCompressionConfig(policy="h2o", budget=12, slack=CHUNK, sink=1, window=2)
    jitted = (gen._empty_caches, gen._prefill, fidelity._empty_caches, fidelity._finish, fidelity._greedy)

    def both(shift):
        gen.init_caches(model, 2, 16)
        fidelity.compressed_generate(model, prompts[:, :16] + shift, kv, max_new_tokens=3, chunk_size=CHUNK)
        return len(traces), [f._cache_size() for f in jitted]

    assert both(0) == both(1)


def test_inference_from_hf_keeps_the_requested_ms_kernel(tmp_path):
    # load_for_inference's HF path (now main/infer.py) passed attention and ms but dropped ms_kernel (the
    # model silently ran the reference kernel).
    from selmerge_jax.main.config import InferConfig
    from selmerge_jax.main.infer import load_for_inference
    from selmerge_jax.models import save_hf
    from selmerge_jax.training.checkpoint import InitConfig

    save_hf(Llama(preset("tiny", num_layers=1), rngs=nnx.Rngs(0)), str(tmp_path))
    want = preset("tiny", num_layers=1, attention="ms", ms_kernel="pallas")
    model = load_for_inference(InferConfig(init=InitConfig(kind="hf", path=str(tmp_path)), model=want))
    assert model.config.attention == "ms" and model.config.ms_kernel == "pallas"


@dataclasses.dataclass(frozen=True)
class _PerToken:
    """The old decode hook: make room inside every step (a cond per layer and token); not a CompressedStep."""

    inner: object

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_greedy_makes_room_once_per_slack_steps_with_the_same_tokens(tiny, policy):
    # compressed_generate checks for room once per `slack` decode steps (no cond in the per-token body, which
    # copied the whole cache each token on the GPU). With capacity = budget + slack the compressions fire at
    # the same steps as the per-token check, so the tokens must be identical; 11 steps = 2 chunks + a tail.
    from flax import nnx as _nnx

    from selmerge_jax.evaluation import fidelity

    model, prompts = tiny
    prompts = prompts[:, :16]
    kv = KVCompressionConfig(policy=policy, ratio=0.5, slack=CHUNK, sink=1, window=2, obs_window=2)
    got, _ = fidelity.compressed_generate(model, prompts, kv, max_new_tokens=12, chunk_size=CHUNK)
    budget, capacity = fidelity._sizes(kv, 16, 12, CHUNK)
    assert capacity == budget + kv.slack
    step = fidelity.CompressedStep(kv, budget)
    caches = fidelity._empty_caches(kv, model.config.num_layers, 2, model.config.num_kv_heads, capacity,
                                    model.config.head_size, jnp.dtype(model.config.jnp_dtype))
    logits, caches = prefill(model, prompts, caches, chunk_size=CHUNK, cache_fn=step)
    caches = fidelity._finish(caches, kv=kv, budget=budget)
    graphdef, state = _nnx.split(model)
    want = fidelity._greedy(graphdef, state, caches, jnp.argmax(logits, -1).astype(jnp.int32), 16, steps=11,
                            cache_fn=_PerToken(step))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kw, error, match", [
    ({"budget": 0}, ValueError, "CompressedStep.budget=0: must be a positive int"),
    ({"budget": True}, ValueError, "CompressedStep.budget=True: must be a positive int"),
    ({"room": 1}, TypeError, "room must be a bool")])
def test_compressed_step_rejects_bad_fields(kw, error, match):
    from selmerge_jax.evaluation import fidelity

    args = {"kv": KVCompressionConfig(policy="h2o", ratio=0.5), "budget": 64, **kw}
    with pytest.raises(error, match=match):
        fidelity.CompressedStep(**args)
