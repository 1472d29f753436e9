"""RoPE only on selected tokens: compact/original positions against a brute-force per-group loop, the
"original" scheme against ms_attention with un-rotated selection, and the MSAttention position hook wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.attention import MSAttentionConfig, ms_attention
from selmerge_jax.attention import selected_positions as sp
from selmerge_jax.attention.selected_positions import gathered_positions
from selmerge_jax.attention.selection import select_regions
from selmerge_jax.kernels.block_sparse_attention.plan import dense_causal_plan
from selmerge_jax.layers import AttentionLayerConfig, MSAttention
from selmerge_jax.positional import CRDNTKConfig, RopeConfig, make_position_fn, rope_frequencies

H = 8
ROPE = make_position_fn(RopeConfig(theta=100.0), H)  # small theta: positions matter a lot at short range
INV = rope_frequencies(RopeConfig(theta=100.0), H)[0].astype(np.float64)
# Jitted once per configuration: eager dispatch of the per-group map costs more than compiling it.
selected_positions_attention = jax.jit(sp.selected_positions_attention, static_argnums=(4,),
                                       static_argnames=("scheme",))
ms_attention_selected_positions = jax.jit(sp.ms_attention_selected_positions, static_argnums=(3, 4))


def _qkv(seed, b=2, t=64, n=4, kh=2, h=H):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, t, kh, h)),
            jax.random.normal(ks[2], (b, t, kh, h)))


def _rope_np(x, pos):
    """float64 half-layout RoPE of x [T', H] at integer positions [T']."""
    ang = pos[:, None] * INV[None, :]
    x1, x2 = x[:, : H // 2], x[:, H // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _brute_force(q, k, v, plan, scheme):
    """One (batch, query head, group) at a time: gather, position, rotate, dense softmax."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    regions, valid = np.asarray(plan.kv_regions), np.asarray(plan.valid_mask())
    b, _, n, _ = q.shape
    kh, p, w, lg = k.shape[2], regions.shape[1], plan.block_size, plan.group_tokens
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            pi, kv = ni // (n // p), ni // (n // kh)
            for g in range(plan.num_groups):
                sel = sorted(int(r) for r, ok in zip(regions[bi, pi, g], valid[bi, pi, g], strict=True) if ok)
                toks = [r * w + i for r in sel for i in range(w)] + list(range(g * lg, (g + 1) * lg))
                toks = np.array(toks, int)
                kpos = np.arange(len(toks)) if scheme == "compact" else toks
                qpos = kpos[-lg:]
                kr = _rope_np(k[bi, toks, kv], kpos)
                qr = _rope_np(q[bi, g * lg:(g + 1) * lg, ni], qpos)
                s = qr @ kr.T / np.sqrt(H)
                s[:, len(sel) * w:] = np.where(np.tril(np.ones((lg, lg), bool)), s[:, len(sel) * w:], -np.inf)
                pr = np.exp(s - s.max(-1, keepdims=True))
                out[bi, g * lg:(g + 1) * lg, ni] = (pr / pr.sum(-1, keepdims=True)) @ v[bi, toks, kv]
    return out


def test_compact_positions_by_hand():
    regions = jnp.array([[[3, -1, 1]]], jnp.int32)  # [B=1, P=1, M=3]: valid regions 1 and 3
    valid = jnp.array([[[True, False, True]]])
    sel, loc = gathered_positions(regions, valid, 5, block_size=2, group_tokens=4, scheme="compact")
    # region 1 -> 0,1; region 3 -> 2,3; invalid -> 0; local block and queries after them: 4..7
    np.testing.assert_array_equal(sel[0, 0], [2, 3, 0, 0, 0, 1])
    np.testing.assert_array_equal(loc[0, 0], [4, 5, 6, 7])
    sel_o, loc_o = gathered_positions(regions, valid, 5, block_size=2, group_tokens=4, scheme="original")
    np.testing.assert_array_equal(sel_o[0, 0], [6, 7, 0, 0, 2, 3])
    np.testing.assert_array_equal(loc_o[0, 0], [20, 21, 22, 23])


@pytest.mark.parametrize("heads, merge, scheme", [
    ("query", 2, "compact"), ("kv", 1, "compact"), ("kv", 2, "original"),
])
def test_matches_brute_force_per_group_loop(heads, merge, scheme):
    q, k, v = _qkv(0)
    cfg = MSAttentionConfig(selection_source="group", block_size=4, top_k=3 * merge, merge=merge,
                            selection_heads=heads)
    plan = select_regions(q, k, cfg)
    assert int(plan.valid_mask().sum(-1).min()) < cfg.num_selected < int(plan.valid_mask().sum(-1).max()) + 1
    got = selected_positions_attention(q, k, v, plan, ROPE.rotate, scheme=scheme)
    np.testing.assert_allclose(got, _brute_force(q, k, v, plan, scheme), rtol=2e-5, atol=2e-5)


def test_original_scheme_equals_ms_attention_with_unrotated_selection():
    q, k, v = _qkv(1)
    cfg = MSAttentionConfig(selection_source="group", block_size=4, top_k=4, merge=2, selection_heads="kv")
    plan = select_regions(q, k, cfg)
    pos = jnp.broadcast_to(jnp.arange(64), (2, 64))
    qr, kr = ROPE(q, k, pos)
    want = jax.jit(lambda *a: ms_attention(*a[:3], cfg, selection_q=a[3], selection_k=a[4]))(qr, kr, v, q, k)
    got = selected_positions_attention(q, k, v, plan, ROPE.rotate, scheme="original")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_plans_give_true_positions_in_both_schemes():
    q, k, v = _qkv(2, t=32)
    plan = dense_causal_plan(2, 2, 32, block_size=4, merge=2)  # every earlier region, in order
    compact = selected_positions_attention(q, k, v, plan, ROPE.rotate, scheme="compact")
    original = selected_positions_attention(q, k, v, plan, ROPE.rotate, scheme="original")
    np.testing.assert_allclose(compact, original, rtol=1e-5, atol=1e-5)


def test_compact_positions_stay_below_top_k_tokens_at_any_length():
    q, k, _ = _qkv(3, b=1, t=128)
    cfg = MSAttentionConfig(selection_source="group", block_size=4, top_k=4, merge=2)
    plan = jax.jit(select_regions, static_argnums=(2,))(q, k, cfg)
    regions, valid = (jnp.moveaxis(x, 2, 0) for x in (plan.kv_regions, plan.valid_mask()))
    sel, loc = jax.vmap(lambda r, ok, g: gathered_positions(r, ok, g, block_size=4, group_tokens=8,
                                                            scheme="compact"))(regions, valid, jnp.arange(16))
    assert int(jnp.maximum(sel.max(), loc.max())) < cfg.attended_tokens  # 16, while T = 128


def test_padding_and_gradients():
    q, k, v = _qkv(4, t=45)  # not a multiple of W * merge = 8: padded internally
    # "previous" selection is strictly causal ("group" lets later tokens of a group steer its selection)
    cfg = MSAttentionConfig(block_size=4, top_k=4, merge=2, selection_source="previous")
    out = ms_attention_selected_positions(q, k, v, cfg, ROPE.rotate)
    assert out.shape == q.shape and bool(jnp.isfinite(out).all())
    longer = ms_attention_selected_positions(*(_pad_random(x) for x in (q, k, v)), cfg, ROPE.rotate)
    np.testing.assert_allclose(out, longer[:, :45], rtol=1e-5, atol=1e-5)  # later tokens never leak back
    loss = lambda a, b, c: sp.ms_attention_selected_positions(a, b, c, cfg, ROPE.rotate).sum()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0 for g in grads)


def _pad_random(x):
    return jnp.concatenate([x, jax.random.normal(jax.random.PRNGKey(9), (x.shape[0], 3, *x.shape[2:]))], 1)


def test_bad_arguments_raise():
    q, k, v = _qkv(5, t=32)
    plan = dense_causal_plan(2, 2, 32, block_size=4)
    with pytest.raises(ValueError, match="scheme"):
        sp.selected_positions_attention(q, k, v, plan, ROPE.rotate, scheme="shifted")
    with pytest.raises(TypeError, match="rotate"):
        sp.selected_positions_attention(q, k, v, plan, None)
    with pytest.raises(ValueError, match="centroids"):
        sp.ms_attention_selected_positions(q, k, v, MSAttentionConfig(block_size=4, top_k=2, centroids=True),
                                        ROPE.rotate)
    with pytest.raises(ValueError, match="position_mode"):
        MSAttentionConfig(selection_source="group", position_mode="after")
    with pytest.raises(ValueError, match="causal"):
        MSAttentionConfig(selection_source="group", position_mode="selected_compact", causal=False)
    with pytest.raises(TypeError, match="rope"):
        AttentionLayerConfig(d_model=16, num_heads=2, rope="yarn")


def _layer(mode, rope=None, **kw):
    ms = MSAttentionConfig(selection_source="group", block_size=4, top_k=3, merge=1, position_mode=mode)
    cfg = AttentionLayerConfig(d_model=16, num_heads=2, rope=rope or RopeConfig(theta=100.0), ms=ms, **kw)
    return MSAttention(cfg, rngs=nnx.Rngs(0))


def test_layer_hook_routes_each_position_mode():
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 32, 16))
    layers = {m: _layer(m) for m in ("before_selection", "selected_original", "selected_compact")}
    lyr = layers["before_selection"]
    cfg = lyr.config.ms

    @jax.jit
    def expected(x):
        q, k, v = (proj(x).reshape(2, 32, 2, H) for proj in (lyr.q_proj, lyr.k_proj, lyr.v_proj))
        qr, kr = ROPE(q, k, jnp.broadcast_to(jnp.arange(32), (2, 32)))
        outs = (ms_attention(qr, kr, v, cfg), ms_attention(qr, kr, v, cfg, selection_q=q, selection_k=k),
                sp.ms_attention_selected_positions(q, k, v, cfg, ROPE.rotate))
        return [lyr.o_proj(o.reshape(2, 32, 16)) for o in outs]

    got = [jax.jit(lambda m, a: m(a))(layer, x) for layer in layers.values()]
    for g, want in zip(got, expected(x), strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[0], got[2]) and not np.allclose(got[1], got[2])  # the switch matters


def test_layer_builds_crd_hook_from_config_and_dense_ignores_mode():
    crd = _layer("before_selection", rope=CRDNTKConfig(cycle=64, original_max_position_embeddings=16))
    x = jax.random.normal(jax.random.PRNGKey(7), (1, 16, 16))
    assert crd.position_fn.config.cycle == 64 and crd(x).shape == x.shape
    dense_a = _layer("selected_compact", implementation="dense")
    dense_b = _layer("before_selection", implementation="dense")
    np.testing.assert_allclose(dense_a(x), dense_b(x), rtol=1e-6)


def test_compact_positions_refuse_logn_queries():
    """Log-n scales q in the hook's (q, k) call, which the compact scheme never makes: refused, not
    skipped."""
    lyr = _layer("selected_compact", rope=RopeConfig(theta=100.0, logn_length=8))
    with pytest.raises(ValueError, match="logn_length=8"):
        lyr(jax.random.normal(jax.random.PRNGKey(7), (1, 16, 16)))


def test_layer_compact_positions_use_the_steps_traced_frequencies():
    from selmerge_jax.positional import CRDNTKFn, RotaryPositions, crd_step
    crd = CRDNTKConfig(cycle=64, original_max_position_embeddings=16, initial_scale=4.0)
    lyr = _layer("selected_compact", rope=crd)
    x = jax.random.normal(jax.random.PRNGKey(8), (1, 16, 16))
    pos = crd_step(crd, 0, jax.random.PRNGKey(9), batch=1, seq_len=16, head_dim=H)
    q, k, v = (proj(x).reshape(1, 16, 2, H) for proj in (lyr.q_proj, lyr.k_proj, lyr.v_proj))
    fn = CRDNTKFn(crd, H)
    rotate = lambda a, p: fn.rotate(a, RotaryPositions(p, pos.inv_freq))
    want = lyr.o_proj(sp.ms_attention_selected_positions(q, k, v, lyr.config.ms, rotate).reshape(1, 16, 16))
    np.testing.assert_allclose(lyr(x, pos), want, rtol=1e-5, atol=1e-5)
