"""The scanned decoder stack equals a layer-by-layer loop; the model and ``MSAttention`` share one
dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_walk import equations

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.layers import AttentionLayerConfig, MSAttention
from selmerge_jax.models import Llama, preset
from selmerge_jax.training.train_step import (
    HiddenStates,
    chunked_cross_entropy,
    init_train_state,
    token_cross_entropy,
)

MS = MSAttentionConfig(block_size=4, top_k=3, selection_source="previous", selection_heads="kv")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 40)), jnp.int32)


def _config(**kw):
    return preset("tiny", vocab_size=64, d_model=32, ffn_dim=48, num_layers=3, **kw)


# Compared under jit: the eager op-by-op run of these small models costs twice the compile time on CPU.
_scanned = nnx.jit(lambda model, tokens: model(tokens))


@nnx.jit
def _looped(model: Llama, tokens):
    """The reference: every layer run on its own, in order (what the model did before layers were scanned)."""
    x = model.embed_tokens(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for i in range(model.config.num_layers):
        x = model.layer(i)(x, positions)[0]
    return model.output_logits(model.norm(x))


@pytest.mark.parametrize("attention", ["dense", "ms"])
def test_scanned_layers_equal_a_loop(attention):
    model = Llama(_config(attention=attention, ms=MS), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_scanned(model, TOKENS), _looped(model, TOKENS), rtol=1e-5, atol=1e-5)


def test_scanned_gradients_equal_looped_gradients():
    model = Llama(_config(attention="ms", ms=MS, remat="full"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(fn, state):
        return jnp.mean(fn(nnx.merge(graphdef, state), TOKENS) ** 2)

    g_scan = jax.jit(jax.grad(lambda s: loss(lambda m, t: m(t), s)))(state)
    g_loop = jax.jit(jax.grad(lambda s: loss(_looped, s)))(state)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_scanned_logits_match_the_loop_to_bf16_tolerance():
    model = Llama(_config(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_scanned(model, TOKENS), _looped(model, TOKENS), rtol=2e-2, atol=2e-2)


def test_layers_are_stacked_and_initialised_independently():
    model = Llama(_config(), rngs=nnx.Rngs(0))
    kernel = model.layers.self_attn.q_proj.kernel[...]
    assert kernel.shape == (3, 32, 32)
    assert not np.allclose(kernel[0], kernel[1])


@pytest.mark.parametrize("i", [-1, 3, 1.0, True])
def test_layer_index_is_checked(i):
    model = Llama(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer index i="):
        model.layer(i)


@pytest.mark.parametrize("mode", ["before_selection", "selected_original", "selected_compact"])
@pytest.mark.parametrize("kind", ["ms", "dense"])
def test_model_attention_equals_ms_attention_layer(mode, kind):
    """The model's attention and the stand-alone layer with the same weights give the same outputs: one
    dispatch, every ``position_mode`` honoured by both (dense attention ignores it in both)."""
    ms = MSAttentionConfig(block_size=4, top_k=3, selection_source="previous", selection_heads="kv",
                           position_mode=mode)
    cfg = _config(attention=kind, ms=ms, dense_kernel="xla")
    attn = Llama(cfg, rngs=nnx.Rngs(0)).layer(0).self_attn
    layer = MSAttention(AttentionLayerConfig(d_model=32, num_heads=cfg.num_heads,
                                             num_kv_heads=cfg.num_kv_heads,
                                             ms=ms, rope=cfg.rope,
                                             implementation="reference" if kind == "ms" else "dense"),
                        rngs=nnx.Rngs(1))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(layer, name).kernel[...] = getattr(attn, name).kernel[...]
    x = jax.random.normal(jax.random.key(2), (2, 24, 32))
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    np.testing.assert_allclose(attn(x, positions)[0], layer(x, positions), rtol=1e-5, atol=1e-5)


def test_position_modes_change_the_models_output():
    """The model used to ignore ``position_mode``; now each mode computes something different."""
    outs = {}
    for mode in ("before_selection", "selected_original", "selected_compact"):
        ms = MSAttentionConfig(block_size=4, top_k=3, selection_source="previous", selection_heads="kv",
                               position_mode=mode)
        outs[mode] = np.asarray(Llama(_config(attention="ms", ms=ms), rngs=nnx.Rngs(0))(TOKENS))
    assert not np.allclose(outs["before_selection"], outs["selected_original"])
    assert not np.allclose(outs["selected_original"], outs["selected_compact"])


def test_packed_documents_with_ms_attention_equal_each_document_alone():
    """Two documents (24 + 16 tokens, starts on group boundaries) packed in one row, positions restarting:
    each document's logits are those of the model run on it alone; without segment_ids they are not."""
    model = Llama(_config(attention="ms", ms=MS), rngs=nnx.Rngs(0))
    tokens = TOKENS[:1]
    positions = jnp.asarray(np.r_[np.arange(24), np.arange(16)])[None]
    segments = jnp.asarray(np.r_[np.zeros(24, int), np.ones(16, int)])[None]
    packed = np.asarray(model(tokens, positions, segment_ids=segments))
    np.testing.assert_allclose(packed[:, :24], model(tokens[:, :24]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 24:], model(tokens[:, 24:]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(model(tokens, positions))[:, 24:], packed[:, 24:], atol=1e-3)


def test_segment_ids_with_ring_or_compact_positions_raise_naming_the_option():
    from selmerge_jax.layers import AttentionSpec, attend

    q = k = jnp.zeros((1, 8, 2, 4))
    seg = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids .*'dense' or 'ms', got attention='ring_ms'"):
        attend(q, k, k, None, AttentionSpec(kind="ring_ms", ms=MS), segment_ids=seg)
    compact = AttentionSpec(kind="ms", ms=MSAttentionConfig(block_size=4, top_k=2,
                                                            position_mode="selected_compact"))
    with pytest.raises(ValueError, match="position_mode='selected_compact'"):
        attend(q, k, k, jnp.zeros((1, 8), jnp.int32), compact, position_fn=lambda q, k, p: (q, k),
               segment_ids=seg)


def test_sliding_window_with_ms_attention_raises():
    with pytest.raises(ValueError, match=r"attention='ms' with sliding_window"):
        _config(attention="ms", sliding_window=8)


def test_ring_ms_refuses_positions_on_selected_tokens():
    from selmerge_jax.layers import AttentionSpec

    ms = MSAttentionConfig(selection_source="group", block_size=4, top_k=3, position_mode="selected_compact")
    with pytest.raises(ValueError,
                       match=r"position_mode='selected_compact' is not supported by attention='ring_ms'"):
        AttentionSpec(kind="ring_ms", ms=ms)


def test_cudnn_dense_kernel_is_refused_on_cpu():
    model = Llama(_config(dense_kernel="cudnn", dtype="bfloat16"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dense_kernel='cudnn' needs a GPU"):
        model(TOKENS)


# one token, ragged, dividing T=40, beyond T; and a head tied to the input embedding
@pytest.mark.parametrize(("chunk", "tie"), [(1, False), (7, False), (8, False), (4096, False), (7, True)])
def test_chunked_cross_entropy_equals_the_full_loss(chunk, tie):
    model = Llama(_config(tie_embeddings=tie), rngs=nnx.Rngs(0))
    targets = jnp.roll(TOKENS, -1, axis=1)
    mask = jnp.asarray(np.random.default_rng(1).random(TOKENS.shape) > 0.3, jnp.float32)

    def chunked(m):
        return chunked_cross_entropy(HiddenStates(m.hidden_states(TOKENS)[0], m.output_logits), targets, mask,
                                     chunk)[0]

    def full(m):
        return token_cross_entropy(m(TOKENS), targets, mask)[0]

    np.testing.assert_allclose(nnx.jit(chunked)(model), nnx.jit(full)(model), rtol=1e-5)
    g_c = nnx.jit(nnx.grad(chunked))(model)
    g_f = nnx.jit(nnx.grad(full))(model)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_f), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_cross_entropy_runs_the_head_once_per_chunk_under_grad(tie):
    """The loss's gradient comes from the forward's logits: one [B, c, V] matmul in the differentiated
    program (a backward that recomputed the logits would hold two), with or without a tied head."""
    graphdef, state = nnx.split(Llama(_config(tie_embeddings=tie), rngs=nnx.Rngs(0)))
    targets, mask = jnp.roll(TOKENS, -1, axis=1), jnp.ones(TOKENS.shape, jnp.float32)

    def loss(state):
        m = nnx.merge(graphdef, state)
        return chunked_cross_entropy(HiddenStates(m.hidden_states(TOKENS)[0], m.output_logits), targets, mask,
                                     8)[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss))(state).jaxpr
    logits = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"
              and e.outvars[0].aval.ndim == 3 and e.outvars[0].aval.shape[-1] == 64]
    assert len(logits) == 1


def _head_dots(jaxpr, d: int, v: int) -> dict:
    """How many of the head's matmuls the program holds: logits ``[B, c, V]`` and its weight's gradient
    (``[D, V]``, or ``[V, D]`` as autodiff transposes it)."""
    shapes = [e.outvars[0].aval.shape for e in equations(jaxpr) if e.primitive.name == "dot_general"]
    return {"logits": sum(len(s) == 3 and s[-1] == v for s in shapes),
            "weight_grad": shapes.count((d, v)) + shapes.count((v, d))}


def test_chunked_cross_entropy_with_a_frozen_head_computes_no_head_weight_gradient():
    graphdef, head, rest = nnx.split(Llama(_config(), rngs=nnx.Rngs(0)), nnx.PathContains("lm_head"), ...)
    targets, mask = jnp.roll(TOKENS, -1, axis=1), jnp.ones(TOKENS.shape, jnp.float32)

    def loss(rest, head):
        m = nnx.merge(graphdef, head, rest)
        return chunked_cross_entropy(HiddenStates(m.hidden_states(TOKENS)[0], m.output_logits), targets, mask,
                                     8)[0]

    frozen = jax.make_jaxpr(jax.grad(loss))(rest, head).jaxpr  # LoRA-like: the head is not differentiated
    trained = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(rest, head).jaxpr
    assert _head_dots(frozen, 32, 64) == {"logits": 1, "weight_grad": 0}
    assert _head_dots(trained, 32, 64) == {"logits": 1, "weight_grad": 1}


def test_chunked_cross_entropy_differentiates_the_mask_and_runs_in_bf16():
    """The mask's gradient is each token's loss; bf16 hidden states give the full loss's gradients."""
    model = Llama(_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
    targets = jnp.roll(TOKENS, -1, axis=1)
    weights = jnp.asarray(np.random.default_rng(2).random(TOKENS.shape), jnp.float32)  # weighted tokens
    h = model.hidden_states(TOKENS)[0]

    def chunked(h, mask):
        return chunked_cross_entropy(HiddenStates(h, model.output_logits), targets, mask, 7)[0]

    def full(h, mask):
        return token_cross_entropy(model.output_logits(h), targets, mask)[0]

    got = jax.grad(chunked, argnums=(0, 1))(h, weights)
    want = jax.grad(full, argnums=(0, 1))(h, weights)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)  # d loss / d mask: the token losses
    np.testing.assert_allclose(got[0].astype(np.float32), want[0].astype(np.float32), rtol=2e-2, atol=1e-4)


def test_chunked_cross_entropy_gives_float16_weights_float16_gradients():
    """The summed head gradient waits in float32 (float16's range), then comes back at the weight's dtype."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(2, 40, 32)), jnp.float16)
    w = jnp.asarray(rng.normal(size=(32, 64)) * 0.1, jnp.float16)
    targets, mask = jnp.roll(TOKENS, -1, axis=1), jnp.ones(TOKENS.shape, jnp.float32)

    def loss(w, h):
        head = lambda x: (x @ w).astype(jnp.float32)
        return chunked_cross_entropy(HiddenStates(h, head), targets, mask, 8)[0]

    def full(w, h):
        return token_cross_entropy((h @ w).astype(jnp.float32), targets, mask)[0]

    got, want = jax.grad(loss)(w, h), jax.grad(full)(w, h)
    assert got.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("head", [lambda x: (x, x), lambda x: x.sum(-1)])  # two outputs; not [B, c, V]
def test_chunked_cross_entropy_refuses_a_head_that_does_not_return_logits(head):
    h = jnp.zeros((2, 40, 32))
    with pytest.raises(ValueError, match=r"HiddenStates.head must map h \[B, c, D\]"):
        chunked_cross_entropy(HiddenStates(h, head), TOKENS, jnp.ones(TOKENS.shape), 8)


def test_chunked_cross_entropy_of_a_fixed_h_runs_no_hidden_state_gradient():
    """Only the head differentiated (h fixed): no ``dh = dlogits W^T`` matmul ``[B, c, D]`` in the program."""
    model = Llama(_config(), rngs=nnx.Rngs(0))
    h = model.hidden_states(TOKENS)[0]
    graphdef, head = nnx.split(model.lm_head)
    targets, mask = jnp.roll(TOKENS, -1, axis=1), jnp.ones(TOKENS.shape, jnp.float32)

    def loss(head, h):
        return chunked_cross_entropy(HiddenStates(h, nnx.merge(graphdef, head)), targets, mask, 8)[0]

    def dh_dots(argnums):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(head, h).jaxpr
        return [e for e in equations(jaxpr) if e.primitive.name == "dot_general"
                and e.outvars[0].aval.shape == (2, 8, 32)]

    assert len(dh_dots((0, 1))) == 1 and not dh_dots(0)


def test_memory_planner_refuses_what_cannot_fit_naming_the_estimate_and_the_largest_fit():
    from selmerge_jax.models.memory import check_fits, train_memory

    cfg = preset("llama2-7b", dtype="bfloat16", param_dtype="bfloat16", remat="full")
    small = train_memory(cfg, batch=1, seq_len=32768)
    assert 25 * 2**30 < small.total < 32 * 2**30  # measured on an H200: 26.5 GB (experiments/results, R22)
    with pytest.raises(ValueError,
                       match=r"seq_len=262144 .* needs an estimated 1[0-9][0-9]\.\d GiB .* the largest "
                                         r"seq_len that fits is \d+"):
        check_fits(cfg, 80 * 2**30, batch=1, seq_len=262144)
    offload = cfg.replace(remat="offload")
    assert train_memory(offload, batch=1, seq_len=131072).total < 40 * 2**30  # measured: 34.6 GB (R23)


def test_training_refuses_a_step_that_cannot_fit_before_compiling(monkeypatch, capsys):
    from selmerge_jax.training import OptimizerConfig, TrainConfig, build_optimizer, loop

    class Device:  # a GPU with 2 GiB, as the planner sees one
        def memory_stats(self):
            return {"bytes_limit": 2 * 2**30}

    monkeypatch.setattr(loop.jax, "local_devices", lambda: [Device()])
    model = Llama(_config(attention="ms", ms=MS), rngs=nnx.Rngs(0))
    tx, _ = build_optimizer(OptimizerConfig(), 10)
    _, state = init_train_state(model, tx)
    loop._check_memory(model, TrainConfig(batch_size=1, seq_len=1024), OptimizerConfig(), state, None)
    captured = capsys.readouterr()
    assert captured.out.count("attended fraction") == 1 and "attended fraction" not in captured.err  # once
    with pytest.raises(ValueError,
                       match=r"seq_len=4194304 .* needs an estimated .* the largest seq_len that fits"):
        loop._check_memory(model, TrainConfig(batch_size=1, seq_len=4194304), OptimizerConfig(), state, None)


def test_an_ms_config_covering_every_region_says_it_is_dense():
    from selmerge_jax.layers import AttentionSpec, describe

    line = describe(AttentionSpec(kind="ms", ms=MSAttentionConfig(block_size=16, top_k=8)), 128)
    assert "top_k covers every region" in line and "attended fraction 1.000" in line


def _count(jaxpr, primitive: str) -> int:
    """Equations of ``primitive`` in a jaxpr and in every jaxpr nested in it (scan bodies, remat, rules)."""
    return sum(eqn.primitive.name == primitive for eqn in equations(jaxpr))


@pytest.mark.parametrize("attention", ["dense", "ms"])
def test_remat_save_recomputes_no_matmul_and_keeps_the_gradients(attention):
    """``remat="save"`` keeps what the backward reads (q/k/v, the plan, the mid-layer residual, gate/up):
    the same gradients as ``"full"``, with every projection and selection matmul run once, not twice."""
    grads, dots = {}, {}
    for remat in ("full", "save"):
        model = Llama(_config(attention=attention, ms=MS, remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        fn = jax.grad(lambda s, gd=graphdef: jnp.mean(nnx.merge(gd, s)(TOKENS) ** 2))
        grads[remat] = jax.jit(fn)(state)
        dots[remat] = _count(jax.make_jaxpr(fn)(state).jaxpr, "dot_general")
    for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["save"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # q, k, v, o, gate, up, down run forward once; "full" runs q, k, v, o, gate, up again in the backward
    # (down's output is not needed there).
    assert dots["full"] - dots["save"] >= 6, dots


def test_full_remat_keeps_the_selection_plan():
    """``remat="full"`` saves MS's plan (int32, a few per query group) besides the layer input, so the
    backward attends with it instead of scoring every region again: the differentiated step runs selection's
    ``top_k`` as often as the forward alone. Under ``nothing_saveable`` (the policy before) it ran twice."""
    model = Llama(_config(attention="ms", ms=MS, remat="full"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(TOKENS) ** 2)

    forward = _count(jax.make_jaxpr(loss)(state).jaxpr, "top_k")
    assert forward >= 1
    assert _count(jax.make_jaxpr(jax.grad(loss))(state).jaxpr, "top_k") == forward
    no_remat = dataclasses.replace(model.config, remat="none")  # the same model, remat off: the same count
    graphdef_none, _ = nnx.split(Llama(no_remat, rngs=nnx.Rngs(0)))
    assert _count(jax.make_jaxpr(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef_none, s)(TOKENS) ** 2)))(
        state).jaxpr, "top_k") == forward


def test_remat_save_keeps_the_mosaic_kernels_residuals():
    """The Mosaic GPU forward kernel runs once per gradient under ``remat="save"`` (its custom VJP hides the
    kernel from the policy, so its out/LSE are kept by name), twice under ``"full"``. Traced only: no GPU."""
    from selmerge_jax.attention.selection import select_regions
    from selmerge_jax.kernels.block_sparse_attention import pallas_mosaic_gpu as mosaic
    from selmerge_jax.kernels.target import HOPPER, compiling_for
    from selmerge_jax.models.config import _REMAT

    q, k, v = (jax.random.normal(jax.random.key(i), (1, 512, heads, 64), jnp.bfloat16)
               for i, heads in enumerate((4, 2, 2)))
    cfg = MSAttentionConfig(block_size=64, top_k=2, selection_source="previous", selection_heads="kv")
    plan = select_regions(q, k, cfg, num_valid_tokens=512)
    calls = {}
    for remat in ("full", "save"):
        loss = jax.checkpoint(lambda q, k, v: jnp.sin(mosaic.block_sparse_attention_mosaic_gpu(
            jnp.sin(q), k, v, plan)).astype(jnp.float32).sum(), policy=_REMAT[remat])
        with compiling_for(HOPPER):
            calls[remat] = _count(jax.make_jaxpr(jax.grad(loss))(q, k, v).jaxpr, "mpmd_map")
    assert calls["full"] - calls["save"] == 1, calls  # the backward's own kernels run in both
