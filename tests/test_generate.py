"""Generation: sampling rules, KV-cache decode == full recompute, windows, no recompiles, prefill memory."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_walk import equations

from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.models import Llama, preset
from selmerge_jax.models.generate import (
    SamplingConfig,
    _decode,
    _prefill,
    complete,
    decode_step,
    generate,
    init_caches,
    prefill,
    prefill_memory,
    sample_logits,
)
from selmerge_jax.models.llama import append_and_attend

SMALL = preset("tiny", vocab_size=64, d_model=32, ffn_dim=48)
_forward = nnx.jit(lambda model, tokens: model(tokens))
_PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _draw(config: SamplingConfig, n: int = 4000) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(_PROBS, jnp.float32)), (n, 4))
    return np.asarray(sample_logits(logits, jax.random.key(0), config))


def test_greedy_and_top_k_one_are_argmax():
    assert set(_draw(SamplingConfig())) == {0}
    assert set(_draw(SamplingConfig(temperature=2.0, top_k=1))) == {0}


def test_temperature_one_matches_the_distribution():
    freq = np.bincount(_draw(SamplingConfig(temperature=1.0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, _PROBS, atol=0.03)


def test_top_p_keeps_the_smallest_nucleus():
    # Mass before token 2 is 0.8 >= 0.6: only tokens 0 and 1 survive, renormalised to 0.625 / 0.375.
    draws = _draw(SamplingConfig(temperature=1.0, top_p=0.6))
    assert set(draws) == {0, 1}
    assert abs(np.mean(draws == 0) - 0.625) < 0.03


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": 0}, "top_k")])
def test_bad_sampling_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


@pytest.fixture(scope="module")
def model():
    return Llama(SMALL, rngs=nnx.Rngs(0))


def _assert_matches_recompute(model, prompts, lengths, out, steps):
    for b in range(prompts.shape[0]):
        seq = np.concatenate([prompts[b, :lengths[b]], np.asarray(out.tokens[b])])
        full = np.asarray(_forward(model, jnp.asarray(seq[None])))[0]
        ref = full[lengths[b] - 1: lengths[b] - 1 + steps]  # the logits that predicted each new token
        np.testing.assert_allclose(np.asarray(out.logits[b]), ref, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref.argmax(-1))


def test_cache_decode_equals_full_recompute_every_step(model):
    prompts = np.random.RandomState(0).randint(0, 64, (2, 13))
    lengths = np.array([13, 7])  # ragged: row 1 is right-padded, its padding must stay invisible
    out = generate(model, prompts, lengths=lengths, max_new_tokens=6, chunk_size=4, eos_ids=(),
                   return_logits=True)
    assert out.tokens.shape == (2, 6) and list(out.lengths) == [6, 6]
    _assert_matches_recompute(model, prompts, lengths, out, 6)


def test_cache_decode_equals_full_recompute_with_logn_attention():
    """Log-n scales each query by its own position: the cached decode (one position per step) and the full
    forward must agree past the training length L."""
    from selmerge_jax.positional import RopeConfig

    logn = Llama(SMALL.replace(rope=RopeConfig(rope_type="ntk", factor=4.0, logn_length=8)), rngs=nnx.Rngs(0))
    prompts = np.random.RandomState(3).randint(0, 64, (2, 13))
    out = generate(logn, prompts, lengths=np.array([13, 9]), max_new_tokens=5, chunk_size=4, eos_ids=(),
                   return_logits=True)
    _assert_matches_recompute(logn, prompts, np.array([13, 9]), out, 5)
    plain = np.asarray(_forward(Llama(SMALL.replace(rope=RopeConfig(rope_type="ntk", factor=4.0)),
                                      rngs=nnx.Rngs(0)), jnp.asarray(prompts)))
    scaled = np.asarray(_forward(logn, jnp.asarray(prompts)))
    np.testing.assert_allclose(scaled[:, :7], plain[:, :7], atol=1e-6)  # positions 0-6: p + 1 <= L, unscaled
    assert np.abs(scaled[:, 8:] - plain[:, 8:]).max() > 1e-4


def _window_six(cache, q, k, v, positions, *, window):
    del window  # this policy imposes its own
    return append_and_attend(cache, q, k, v, positions, window=6)


def test_sliding_window_decode_runs_past_the_window(model):
    windowed = Llama(SMALL.replace(sliding_window=6), rngs=nnx.Rngs(0))
    prompts = np.random.RandomState(1).randint(0, 64, (1, 5))
    out = generate(windowed, prompts, max_new_tokens=10, chunk_size=4, eos_ids=(), return_logits=True)
    _assert_matches_recompute(windowed, prompts, [5], out, 10)
    # A prompt longer than the window: chunked prefill masks each query's own window, so it stays exact.
    long = np.random.RandomState(3).randint(0, 64, (1, 13))
    out_long = generate(windowed, long, max_new_tokens=4, chunk_size=4, eos_ids=(), return_logits=True)
    _assert_matches_recompute(windowed, long, [13], out_long, 4)
    # The same window as a cache_fn on the unwindowed model (same weights): the hook runs in prefill and
    # decode.
    hooked = generate(model, prompts, max_new_tokens=10, chunk_size=4, eos_ids=(), cache_fn=_window_six)
    np.testing.assert_array_equal(hooked.tokens, out.tokens)


def test_eos_stops_rows_and_nothing_recompiles(model):
    prompts = np.random.RandomState(2).randint(0, 64, (2, 9))
    first = generate(model, prompts, max_new_tokens=5, chunk_size=4, eos_ids=())
    sizes = (_prefill._cache_size(), _decode._cache_size())
    eos = int(first.tokens[0, 0])
    out = generate(model, prompts + 0, max_new_tokens=5, chunk_size=4, eos_ids=(eos,), pad_id=63)
    assert int(out.lengths[0]) == 1 and set(np.asarray(out.tokens[0, 1:])) == {63}
    assert (_prefill._cache_size(), _decode._cache_size()) == sizes  # new prompts and end ids: same programs


def test_decode_step_traces_once(model):
    graphdef, state = nnx.split(model)
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, caches, tokens, positions, key):
        return decode_step(nnx.merge(graphdef, state), caches, tokens, positions, key, sampling)

    caches = init_caches(model, 2, 8)
    tokens = jnp.array([3, 5], jnp.int32)
    for i in range(5):
        tokens, logits, caches = step(state, caches, tokens, jnp.full((2,), i, jnp.int32), jax.random.key(i))
    assert logits.shape == (2, 64) and int(caches[0].length) == 5


def test_prefill_validates_inputs(model):
    caches = init_caches(model, 1, 8)
    with pytest.raises(ValueError, match="lengths must be"):
        prefill(model, np.zeros((1, 4), np.int32), caches, lengths=[5])
    with pytest.raises(ValueError, match="capacity=4"):
        generate(model, np.zeros((1, 4), np.int32), max_new_tokens=3, chunk_size=4, capacity=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, np.zeros((1, 4), np.int32), max_new_tokens=0)
    with pytest.raises(ValueError, match="chunk_size"):  # was a ZeroDivisionError before any check
        generate(model, np.zeros((1, 4), np.int32), max_new_tokens=2, chunk_size=0)


def test_chunked_prefill_memory_is_linear_in_length():
    tiny = nnx.eval_shape(lambda: Llama(preset("tiny"), rngs=nnx.Rngs(0)))  # compiled, never run
    mem = {n: prefill_memory(tiny, batch=1, prompt_len=n, chunk_size=512) for n in (8192, 16384, 32768)}
    # Quadratic growth would multiply by 4 per doubling; the [chunk, capacity] buffer only doubles.
    assert mem[32768]["peak"] <= 2.1 * mem[16384]["peak"] <= 4.41 * mem[8192]["peak"]
    # f32 T x T scores for the 4 heads at 32K would take 16 GiB; the whole compiled prefill stays below 1 GiB.
    assert mem[32768]["peak"] < 2**30


def test_complete_with_byte_tokenizer():
    tok = ByteTokenizer()
    byte_model = Llama(preset("tiny", d_model=32, ffn_dim=48), rngs=nnx.Rngs(0))
    text = complete(byte_model, tok, "def f(x):", max_new_tokens=4, chunk_size=16)
    assert isinstance(text, str)


@pytest.mark.slow
def test_prefill_32k_prompt_runs_on_cpu():
    tiny = Llama(preset("tiny"), rngs=nnx.Rngs(0))
    prompt = np.random.RandomState(0).randint(0, 259, (1, 32768))
    logits, caches = prefill(tiny, prompt, init_caches(tiny, 1, 32768), chunk_size=1024)
    assert np.isfinite(np.asarray(logits)).all() and int(caches[0].length) == 32768


def _ms_model(top_k):
    from selmerge_jax.attention import MSAttentionConfig
    from selmerge_jax.models import Llama, preset

    ms = MSAttentionConfig(block_size=8, top_k=top_k, selection_source="previous", selection_heads="kv")
    return Llama(preset("tiny", vocab_size=64, d_model=32, ffn_dim=48, attention="ms", ms=ms),
                 rngs=nnx.Rngs(3))


def test_one_pass_ms_prefill_equals_the_models_own_forward():
    """``prefill_attention="model"``: the prompt's last-token logits are those of the model's MS forward,
    ragged rows included, and decoding continues from a cache holding every prompt token."""
    from selmerge_jax.models.generate import generate, init_caches, prefill

    model = _ms_model(top_k=3)
    prompts = np.random.default_rng(0).integers(0, 64, (2, 61)).astype(np.int32)
    lengths = np.array([61, 40], np.int32)
    logits, _ = prefill(model, prompts, init_caches(model, 2, 64), lengths=lengths,
                        prefill_attention="model")
    full = np.asarray(model(jnp.asarray(prompts)))
    np.testing.assert_allclose(logits[0], full[0, 60], rtol=1e-5, atol=1e-5)
    short = np.asarray(model(jnp.asarray(prompts[1:, :40])))
    np.testing.assert_allclose(logits[1], short[0, 39], rtol=1e-5, atol=1e-5)
    # Sparse selection really differs from exact attention over the cache at this length.
    exact, _ = prefill(model, prompts, init_caches(model, 2, 64), lengths=lengths, chunk_size=16)
    assert np.abs(np.asarray(exact) - np.asarray(logits)).max() > 1e-3
    out = generate(model, prompts, lengths=lengths, max_new_tokens=3, prefill_attention="model")
    assert out.tokens.shape == (2, 3)


def test_one_pass_prefill_equals_the_chunked_exact_prefill_when_everything_is_selected():
    from selmerge_jax.models.generate import generate

    model = _ms_model(top_k=8)  # 8 regions of 8 tokens: every earlier token is selected at T <= 64
    prompts = np.random.default_rng(1).integers(0, 64, (1, 48)).astype(np.int32)
    a = generate(model, prompts, max_new_tokens=4, return_logits=True, prefill_attention="model")
    b = generate(model, prompts, max_new_tokens=4, return_logits=True, chunk_size=16, capacity=52)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)


def test_one_pass_prefill_refuses_a_cache_too_small_and_a_policy():
    from selmerge_jax.models.generate import init_caches, prefill

    model = _ms_model(top_k=3)
    prompts = np.zeros((1, 40), np.int32)
    with pytest.raises(ValueError, match=r"T=40 does not fit the caches' capacity=32"):
        prefill(model, prompts, init_caches(model, 1, 32), prefill_attention="model")
    with pytest.raises(ValueError,
                       match=r"prefill_attention='fast': must be one of the allowed values; allowed"):
        prefill(model, prompts, init_caches(model, 1, 64), prefill_attention="fast")
    with pytest.raises(ValueError, match=r"cache_fn .* applies only with prefill_attention='cache'"):
        prefill(model, prompts, init_caches(model, 1, 64), prefill_attention="model", cache_fn=lambda *a,
                **k: None)


def test_residual_chunked_equals_the_whole_call_for_any_length():
    from selmerge_jax.models.llama import residual_chunked

    x = jax.random.normal(jax.random.key(0), (2, 37, 8))
    fn = lambda y: jnp.tanh(y) * 2.0 + y.sum(-1, keepdims=True)
    for chunk in (5, 8, 37, 64):  # padded tail, exact multiple, one slice, shorter than the chunk
        np.testing.assert_allclose(residual_chunked(fn, x, chunk), x + fn(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        residual_chunked(fn, x, 0)
    with pytest.raises(ValueError, match=r"x must be \[B, T, D\]"):
        residual_chunked(fn, x[0], 8)


def test_one_pass_prefill_with_a_sliced_mlp_equals_the_models_own_forward(monkeypatch):
    """The inference path runs the MLP ``MLP_CHUNK`` tokens at a time (a 1M-token prompt's intermediates
    would not fit): with slices of 16 tokens over a 61-token prompt the logits are still the model's."""
    from selmerge_jax.models import llama
    from selmerge_jax.models.generate import init_caches, prefill

    monkeypatch.setattr(llama, "MLP_CHUNK", 16)
    sliced, whole = [], llama.residual_chunked
    spy = lambda fn, x, c: sliced.append((x.shape[1], c)) or whole(fn, x, c)
    monkeypatch.setattr(llama, "residual_chunked", spy)
    jax.clear_caches()  # nothing compiled with the default slice may answer this call
    model = _ms_model(top_k=3)
    prompts = np.random.default_rng(4).integers(0, 64, (1, 61)).astype(np.int32)
    logits, _ = prefill(model, prompts, init_caches(model, 1, 64), prefill_attention="model")
    full = np.asarray(model(jnp.asarray(prompts)))
    np.testing.assert_allclose(logits[0], full[0, 60], rtol=1e-5, atol=1e-5)
    assert sliced == [(61, 16)] * model.config.num_layers


def test_one_pass_prefill_keeps_no_per_layer_token_buffers(monkeypatch):
    """The planned bytes of a one-pass prefill grow with depth by the caches alone, not by a ``[T, D]`` buffer
    per layer: a sliced MLP writing into a fresh zeros buffer got that buffer shared between layers and copied
    once per layer, early, by XLA (the 512K-token plans of an 8B model were 107 GiB over their estimate)."""
    from selmerge_jax.models import llama
    from selmerge_jax.models.generate import prefill_memory

    monkeypatch.setattr(llama, "MLP_CHUNK", 2048)
    t, d = 16384, 128  # long enough that per-token bytes dwarf the CPU's float32 copies of the weights

    def temp(layers):
        cfg = preset("tiny", vocab_size=64, d_model=d, num_heads=2, num_kv_heads=1, ffn_dim=128,
                     num_layers=layers, dtype="bfloat16", param_dtype="bfloat16", dense_kernel="xla")
        model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        return prefill_memory(model, batch=1, prompt_len=t, prefill_attention="model")["temp"]

    jax.clear_caches()
    per_layer = (temp(4) - temp(2)) / 2
    # measured on CPU: 0.54 of one [T, D] bf16 buffer per layer (the weights' float32 copies, scheduling);
    # with the zeros buffer it was 1.09
    assert per_layer < 0.75 * t * d * 2, per_layer


def test_long_inference_calls_run_layers_behind_a_barrier_and_decode_steps_do_not(monkeypatch):
    """A long prompt's layers each start behind an optimization barrier (XLA may not hoist their weight
    slices); a short call (a decode step) has none."""
    from selmerge_jax.models import llama
    from selmerge_jax.models.generate import init_caches

    monkeypatch.setattr(llama, "BARRIER_MIN_TOKENS", 16)
    model = Llama(preset("tiny", vocab_size=64, d_model=32, ffn_dim=48), rngs=nnx.Rngs(0))
    caches = init_caches(model, 1, 32)

    def barriers(t):
        tokens = jnp.zeros((1, t), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
        jaxpr = jax.make_jaxpr(lambda tok: model.hidden_states(tok, pos, caches=caches)[0])(tokens)
        return str(jaxpr).count("optimization_barrier")

    assert barriers(16) == model.config.num_layers
    assert barriers(1) == 0


def test_a_compressing_prefill_starts_each_layer_after_the_previous_layers_cache(monkeypatch):
    """With a compressing one-pass prefill (``CompressedPromptAttention``) every layer after the first also
    waits for the previous layer's cache, whose compression nothing else reads (XLA may otherwise keep the
    prompt-long q/k/v of several layers alive); the full-cache prefill adds no such barrier."""
    from selmerge_jax.kvcache import KVCompressionConfig
    from selmerge_jax.models import generate_long as long
    from selmerge_jax.models import llama
    from selmerge_jax.models.generate import PromptAttention

    monkeypatch.setattr(llama, "BARRIER_MIN_TOKENS", 16)
    cfg = preset("tiny", vocab_size=64, d_model=32, ffn_dim=48, num_layers=3)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    snap = KVCompressionConfig(policy="snapkv", budget=8, slack=8, sink=1, window=2, obs_window=2)
    tokens = jnp.zeros((1, 32), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (1, 32))

    def barriers(caches, cache_fn):
        jaxpr = jax.make_jaxpr(lambda tok: model.hidden_states(tok, pos, caches=caches, cache_fn=cache_fn)[0])
        return str(jaxpr(tokens)).count("optimization_barrier")

    compressed = long.compressed_caches(cfg, 1, snap, 32)
    assert barriers(compressed, long.CompressedPromptAttention(cfg.attention_spec, snap)) == 3 + 2
    assert barriers(init_caches(model, 1, 32), PromptAttention(cfg.attention_spec)) == 3


def test_the_decode_loop_slices_the_stacked_layer_weights_once_not_every_step():
    """``_decode`` slices each layer's weights before its loop (``Llama.layer_states``): inside the loop no
    equation reads a stacked ``[L, ...]`` weight, which on a GPU XLA copied every step (6.3 ms of a 13.3 ms
    8K decode step at the 8B shape). The sliced and the hoisted steps give the same tokens."""
    cfg = preset("tiny", vocab_size=64, d_model=32, ffn_dim=48, num_layers=3)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    stacked = {tuple(a.shape) for a in jax.tree.leaves(nnx.state(model.layers))}
    assert all(s[0] == 3 for s in stacked)
    caches = init_caches(model, 1, 16)
    logits = jnp.zeros((1, cfg.vocab_size), jnp.float32)
    args = (state, caches, logits, jnp.array([4], jnp.int32), jax.random.key(0), jnp.int32(0),
            jnp.asarray((-1,), jnp.int32))
    kw = dict(sampling=SamplingConfig(), max_new=4, keep_logits=False)
    jaxpr = jax.make_jaxpr(lambda *a: _decode(graphdef, *a, **kw))(*args).jaxpr
    loops = [e for e in equations(jaxpr) if e.primitive.name == "while"]
    assert len(loops) == 1
    body = loops[0].params["body_jaxpr"].jaxpr
    readers = [e.primitive.name for e in equations(body)
               if any(tuple(getattr(v.aval, "shape", ())) in stacked for v in e.invars)]
    assert readers == [], readers

    layers = model.layer_states()
    tok, pos = jnp.array([3], jnp.int32), jnp.array([0], jnp.int32)
    sliced = decode_step(model, init_caches(model, 1, 16), tok, pos, jax.random.key(0), SamplingConfig())
    hoisted = decode_step(model, init_caches(model, 1, 16), tok, pos, jax.random.key(0), SamplingConfig(),
                          layers=layers)
    np.testing.assert_array_equal(np.asarray(sliced[1]), np.asarray(hoisted[1]))
    with pytest.raises(ValueError, match="one state per layer"):
        decode_step(model, init_caches(model, 1, 16), tok, pos, jax.random.key(0), SamplingConfig(),
                    layers=(layers[0], layers[1][:2]))
    with pytest.raises(ValueError, match="layers"):
        model.hidden_states(tok[:, None], layers=layers)  # no caches: the scanned forward
