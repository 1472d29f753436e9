"""Issue #23 on CPU: compression during a one-pass prefill (budget-sized caches, the reference kept set),
query-aware selective decode through ``generate`` (ragged batches), and bad input named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.kvcache import policies as kp
from selmerge_jax.kvcache import prefill as kpre

B, K, G, H = 2, 2, 2, 8
N = K * G

LAYER_CONFIGS = {
    "snapkv": dict(policy="snapkv", obs_window=5, pool_kernel=3, window=2),
    "h2o_kvpress": dict(policy="h2o", scoring="kvpress"),
    "tova_published": dict(policy="tova", scoring="published"),
    "streaming": dict(policy="streaming"),
    "snapkv_centroid": dict(policy="snapkv", obs_window=4, merge="centroid", merge_slots=2),
}


def _data(s, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, s, N, H)), jax.random.normal(ks[1], (B, s, K, H)),
            jax.random.normal(ks[2], (B, s, K, H)))


@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_compress_prompt_keeps_what_chunked_prefill_keeps(name):
    # A 37-token prompt (row 1 ragged: 29 real, right-padded) in chunks of 8 (not a divisor: left padding),
    # budget 12: several compressions fire inside the prompt. Only the scored rows are attended.
    s, chunk, budget = 37, 8, 12
    config = KVCompressionConfig(budget=budget, slack=chunk, sink=1, **{"window": 3, **LAYER_CONFIGS[name]})
    q, k, v = _data(s)
    pos = jnp.broadcast_to(jnp.arange(s), (B, s))
    pos = pos.at[1].set(jnp.where(jnp.arange(s) < 29, jnp.arange(s), -1))
    cache = kp.init_for(config, B, K, budget + chunk, H, jnp.float32)
    _, ref = jax.jit(lambda c: kpre.chunked_prefill(c, config, q, k, v, pos, chunk=chunk,
                                                    budget=budget))(cache)
    got = jax.jit(lambda c: kpre.compress_prompt(c, config, q, k, v, pos, chunk=chunk, budget=budget))(cache)
    np.testing.assert_array_equal(got.pos, ref.pos)  # the kept set, slot for slot
    np.testing.assert_allclose(got.k, ref.k, rtol=1e-5, atol=1e-5)  # merged centroids too
    np.testing.assert_allclose(got.count, ref.count, rtol=1e-6)
    assert int(got.length) == budget and got.capacity == budget + chunk


def test_scored_rows_per_policy():
    rows = lambda **kw: kpre.scored_rows(KVCompressionConfig(budget=64, **kw), 16)
    assert (rows(policy="snapkv", obs_window=8), rows(policy="snapkv", obs_window=32)) == (8, 16)
    assert (rows(policy="tova"), rows(policy="h2o"), rows(policy="streaming")) == (1, 16, 0)


# ---- through the model: the one-pass prefill compresses as it goes -----------------------------------------

from flax import nnx  # noqa: E402

from selmerge_jax import kvcache  # noqa: E402
from selmerge_jax.attention import MSAttentionConfig  # noqa: E402
from selmerge_jax.models import Llama, preset  # noqa: E402
from selmerge_jax.models import generate as gen  # noqa: E402
from selmerge_jax.models import generate_long as long  # noqa: E402

V = 64


def _model(top_k=3, layers=2):
    ms = MSAttentionConfig(block_size=8, top_k=top_k, selection_source="previous", selection_heads="kv")
    cfg = preset("tiny", vocab_size=V, d_model=32, ffn_dim=48, num_layers=layers, attention="ms", ms=ms)
    return Llama(cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(b=2, t=48, seed=0):
    return np.random.default_rng(seed).integers(3, V, (b, t)).astype(np.int32)


SNAP = KVCompressionConfig(policy="snapkv", budget=16, slack=8, sink=1, window=2, obs_window=4, pool_kernel=3)


def test_one_pass_compressed_prefill_fills_budget_sized_caches_with_the_reference_kept_set(model):
    """MS one pass + compression during the prefill: every layer's cache has budget + slack slots and holds
    ``budget`` after the prompt; layer 0 (whose q/k/v do not depend on the attention) keeps exactly what
    SnapKV keeps when it sees the whole prompt at once (the chunked exact prefill in one chunk, then
    compressed once: the published protocol, ``kvcache.snapkv_once``), ragged rows included."""
    prompts, lengths = _prompts(), np.array([48, 37])
    caches = long.compressed_caches(model.config, 2, SNAP, 48)
    logits, got = gen.prefill(model, prompts, caches, lengths=lengths, prefill_attention="model",
                              compression=SNAP)
    assert kvcache.one_shot(SNAP)
    assert [c.capacity for c in got] == [24, 24] and {int(c.length) for c in got} == {16}
    whole = dataclasses.replace(SNAP, slack=48)  # room for the prompt as one chunk
    _, ref = gen.prefill(model, prompts, long.compressed_caches(model.config, 2, whole, 48), lengths=lengths,
                         chunk_size=48, compression=whole)
    np.testing.assert_array_equal(got[0].pos, kp.compress(ref[0], whole, 16).pos[..., :24])
    assert int(got[1].pos.max()) == 47 and int(got[1].pos[1].max()) == 36  # the newest real token is kept
    out = gen.decode(model, got, logits, lengths, max_new_tokens=12, compression=SNAP)[0]  # compresses again
    assert out.tokens.shape == (2, 12)


def test_a_snapkv_decode_with_room_runs_the_plain_step_and_decodes_the_same_tokens(model):
    """SnapKV decides once, from the prompt: a decode whose tokens all fit the free slots runs the model's
    plain step (no per-step scoring) and gives the logits of the scoring step; without room, or for a policy
    that accumulates what decode steps see (H2O), the scoring step stays."""
    prompts, lengths = _prompts(), np.array([48, 37])
    logits, caches = gen.prefill(model, prompts, long.compressed_caches(model.config, 2, SNAP, 48),
                                 lengths=lengths, prefill_attention="model", compression=SNAP)
    assert long.decode_compression(SNAP, caches, 8) is None  # 24 slots, 16 held
    assert long.decode_compression(SNAP, caches, 9) is SNAP
    h2o = KVCompressionConfig(policy="h2o", budget=16, slack=8, sink=1, window=2)
    assert long.decode_compression(h2o, caches, 1) is h2o
    streaming = KVCompressionConfig(policy="streaming", budget=16, slack=8, sink=1, window=2)
    assert long.decode_compression(streaming, caches, 8) is None
    selective = long.with_selection(caches, kvcache.DecodeSelection(block=8, top_m=2))
    assert long.decode_compression(SNAP, selective, 8) is None
    assert long.decode_compression(SNAP, selective, 9) is SNAP
    traced = []  # under jit the cursor is unknown: keep the scoring step
    jax.jit(lambda cs: traced.append(long.decode_compression(SNAP, cs, 1)) or 0)(caches)
    assert traced == [SNAP]
    graphdef, state = nnx.split(model)
    args = (graphdef, state)
    rest = (logits, jnp.asarray(lengths), jax.random.key(0), jnp.int32(0), jnp.asarray((-1,), jnp.int32))
    kw = dict(sampling=gen.SamplingConfig(), max_new=9, keep_logits=True)
    copy = lambda cs: jax.tree.map(jnp.copy, cs)
    scoring = gen._decode(*args, copy(caches), *rest, cache_fn=long.CompressedStep(SNAP), **kw)
    plain = gen._decode(*args, copy(caches), *rest, cache_fn=None, **kw)
    np.testing.assert_allclose(plain[2], scoring[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(plain[0], scoring[0])
    out, after = gen.decode(model, copy(caches), logits, lengths, max_new_tokens=9, compression=SNAP)
    np.testing.assert_array_equal(out.tokens, scoring[0])
    # the plain step left the prompt's votes in place
    np.testing.assert_array_equal(after[0].votes, caches[0].votes)


def test_compiled_compressed_prefill_holds_budget_sized_caches():
    """The compiled one-pass prefill's caches (arguments and outputs) are budget-sized at every prompt length,
    and its peak grows with the prompt by one layer's activations only, less than a full cache grows."""
    one = _model(layers=1)
    at = lambda t, c: gen.prefill_memory(one, batch=1, prompt_len=t, prefill_attention="model",
                                         compression=c, capacity=t)
    small, large = at(64, SNAP), at(256, SNAP)
    # 24 slots of k/v + position, count, score and SnapKV's 4 window rows per kv head, + the two int32 cursors
    assert small["cache"] == large["cache"] == 24 * (2 * 2 * 8 * 4 + 2 * (12 + 4 * 4)) + 8
    full_small, full_large = at(64, None), at(256, None)
    assert full_large["cache"] - full_small["cache"] == 192 * (2 * 2 * 8 * 4 + 2 * 12)
    assert large["peak"] - small["peak"] < full_large["peak"] - full_small["peak"]
    assert large["cache"] < full_large["cache"] / 8


# ---- decode at long context: query-aware selection through generate ----------------------------------------

def test_selective_decode_covering_every_block_equals_dense_decode_ragged_batch(model):
    """Selective decode (top blocks + centroids) over the full cache of a one-pass MS prefill, batch 2 with
    ragged prompts: when top_m covers every block it is the dense decode, step for step."""
    prompts, lengths = _prompts(t=40, seed=1), np.array([40, 29])
    kw = dict(lengths=lengths, max_new_tokens=6, return_logits=True, eos_ids=(), prefill_attention="model",
              capacity=48)
    dense = gen.generate(model, prompts, **kw)
    every = kvcache.DecodeSelection(block=8, top_m=6, centroids=True)  # 48 slots: 6 blocks
    sel = gen.generate(model, prompts, selection=every, **kw)
    np.testing.assert_allclose(sel.logits, dense.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(sel.tokens, dense.tokens)


def test_selective_decode_over_a_compressed_cache_equals_its_dense_decode(model):
    """Compression during the prefill, then decode past a compression (every ``slack`` steps): selective
    decode over every block of the budget cache equals the dense decode over it, scores included."""
    prompts, lengths = _prompts(t=40, seed=2), np.array([40, 33])
    cfg = KVCompressionConfig(policy="h2o", budget=16, slack=8, sink=1, window=2)
    kw = dict(lengths=lengths, max_new_tokens=12, return_logits=True, eos_ids=(), prefill_attention="model",
              compression=cfg)
    dense = gen.generate(model, prompts, **kw)
    sel = gen.generate(model, prompts, selection=kvcache.DecodeSelection(block=8, top_m=3), **kw)
    np.testing.assert_allclose(sel.logits, dense.logits, rtol=1e-4, atol=1e-4)


def test_selective_decode_reads_only_its_blocks():
    """With few blocks selected, the step's output is the attention over exactly the chosen blocks' slots."""
    sel = kvcache.DecodeSelection(block=8, top_m=2, centroids=False)
    (_, k, v), (q1, k1, v1) = _data(32, seed=5), (x[:1, :1] for x in _data(1, seed=6))

    @jax.jit
    def run():
        cache = kvcache.init_cache(1, K, 40, H, jnp.float32)
        cache = kvcache.append(cache, k[:1], v[:1], jnp.arange(32)[None])
        sc = kvcache.init_selective(cache, sel)
        out, sc = kvcache.selective_step(sc, sel, q1, k1, v1, jnp.array([[32]]))
        blocks = kvcache.select_blocks(sc.cache, q1, block=8, top_m=2)  # [1, K, 2]; the newest block forced
        slots = (blocks[..., None] * 8 + jnp.arange(8)).reshape(1, K, -1)
        take = lambda x: jnp.take_along_axis(x, slots[..., None] if x.ndim == 4 else slots, axis=2)
        c = sc.cache
        ref = kvcache.attend_slots(q1, jnp.array([[32]]), take(c.k), take(c.v), take(c.pos), take(c.count))
        return out, ref, blocks

    out, ref, blocks = run()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert int(blocks[0, 0, -1]) == 4  # the block holding the new token


# ---- bad input, named before anything compiles -------------------------------------------------------------

def test_bad_long_inference_input_is_named(model):
    prompts = _prompts(b=1, t=40)
    with pytest.raises(ValueError, match=r"budget of layer 0=64: must be smaller than the prompt \(T=40"):
        gen.generate(model, prompts, max_new_tokens=2, prefill_attention="model",
                     compression=KVCompressionConfig(policy="snapkv", budget=64, slack=8, sink=1, window=2))
    with pytest.raises(ValueError, match=r"chunk_size=16: must be <= KVCompressionConfig.slack=8"):
        gen.prefill(model, prompts, long.compressed_caches(model.config, 1, SNAP, 40), chunk_size=16,
                    compression=SNAP)
    with pytest.raises(ValueError, match=r"DecodeSelection.block=7: must be a divisor of the cache capacity "
                                         r"C=48; allowed: .*6, 8, 12, 16, 24, 48"):
        gen.generate(model, prompts, max_new_tokens=2, capacity=48, prefill_attention="model",
                     selection=kvcache.DecodeSelection(block=7, top_m=2))
    with pytest.raises(ValueError, match=r"prompt T=40 does not fit the caches' capacity=16"):
        gen.prefill(model, prompts, gen.init_caches(model, 1, 16))
    with pytest.raises(ValueError, match=r"KVCompressionConfig.policy='snap': must be one of"):
        KVCompressionConfig(policy="snap", budget=8)
    with pytest.raises(ValueError, match=r"KVCompressionConfig.quant='int8': must be 'none'"):
        gen.prefill(model, prompts, long.compressed_caches(model.config, 1, SNAP, 40),
                    prefill_attention="model",
                    compression=KVCompressionConfig(policy="h2o", budget=16, slack=8, sink=1, window=2,
                                                    quant="int8"))


def test_a_prompt_that_does_not_fit_is_refused_with_the_estimate_and_the_largest_that_fits():
    """Llama-3-8B shape, 1M-token prompt, full bf16 cache, on a 141 GB device: refused before compiling (the
    model and caches are abstract: nothing is allocated), naming the estimate and the largest prompt that
    fits; a 1/8 budget shrinks the cache part eightfold."""
    from selmerge_jax.models import memory

    cfg = preset("llama3-8b", dtype="bfloat16", param_dtype="bfloat16", attention="ms")
    t, limit = 2**20, 141 * 2**30
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    caches = jax.eval_shape(lambda: gen.init_caches(abstract, 1, t + 64))
    with pytest.raises(ValueError, match=r"prompt_len=1048576 .* needs an estimated \d+\.\d GiB "
                                         r"\(weights 15\.0, cache 131\.0, .*the largest prompt that fits is "
                                         r"\d+ tokens"):
        gen.prefill(abstract, np.zeros((1, t), np.int32), caches, prefill_attention="model",
                    memory_limit=limit)
    full = memory.inference_memory(cfg, batch=1, prompt_len=t, new_tokens=64)
    eighth = memory.inference_memory(cfg, batch=1, prompt_len=t, new_tokens=64,
                                     compression=KVCompressionConfig(policy="h2o", ratio=1 / 8, slack=256))
    assert 7 < full.cache / eighth.cache < 8.5
    assert 0 < memory.largest_fitting_prompt(cfg, limit, new_tokens=64) < t
