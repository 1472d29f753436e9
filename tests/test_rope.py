"""RoPE: hand-derived frequencies for every scaling rule, HF config round trips, rotation invariants."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax.positional import RopeConfig, apply_rope, make_position_fn, rope_angles, rope_frequencies
from selmerge_jax.positional.rope import yarn_correction_range

D = 128


def _default(i, base=1e4, d=D):
    return base ** (-2 * i / d)


@pytest.mark.parametrize("i", [0, 1, 32, 63])
def test_default_and_linear_frequencies(i):
    inv, scale = rope_frequencies(RopeConfig(), D)
    assert inv.dtype == np.float32 and inv.shape == (64,) and scale == 1.0
    np.testing.assert_allclose(inv[i], _default(i), rtol=1e-6)
    assert math.isclose(float(rope_frequencies(RopeConfig(), D)[0][32]), 0.01, rel_tol=1e-6)  # 1e4^-0.5
    inv_lin, _ = rope_frequencies(RopeConfig(rope_type="linear", factor=4.0), D)
    np.testing.assert_allclose(inv_lin[i], _default(i) / 4, rtol=1e-6)


def test_fixed_ntk_base():
    # base' = 1e4 * 8^(64/63) = 1e4 * 8 * e^(ln 8 / 63) = 82684.6: the CRD NTK inference rule with A = 8.
    cfg = RopeConfig(rope_type="ntk", factor=8.0)
    assert math.isclose(cfg.ntk_base(D), 1e4 * 8 ** (128 / 126), rel_tol=1e-12)
    assert math.isclose(cfg.ntk_base(D), 82684.6, rel_tol=1e-4)
    inv, _ = rope_frequencies(cfg, D)
    np.testing.assert_allclose(inv[[0, 32, 63]], [1.0, 82684.6**-0.5, 82684.6 ** (-126 / 128)], rtol=1e-4)


def test_dynamic_ntk_matches_hf_rule_and_never_recompiles():
    cfg = RopeConfig(rope_type="dynamic", factor=4.0, original_max_position_embeddings=4096)
    short, _ = rope_frequencies(cfg, D, seq_len=1000)  # L <= L0: the original frequencies
    np.testing.assert_allclose(short, rope_frequencies(RopeConfig(), D)[0], rtol=1e-6)
    base = 1e4 * (4 * 16384 / 4096 - 3) ** (128 / 126)  # = 1e4 * 13^(64/63)
    calls = chex.assert_max_traces(lambda n: rope_frequencies(cfg, D, seq_len=n)[0], n=1)
    f = jax.jit(calls)
    want = [1.0, base**-0.5, base ** (-126 / 128)]
    np.testing.assert_allclose(f(16384)[np.array([0, 32, 63])], want, rtol=1e-5)
    f(70000)  # a different length: same trace
    assert float(f(70000)[63]) < float(f(16384)[63])


def test_yarn_ramp_and_temperature_by_hand():
    cfg = RopeConfig(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096)
    # low = floor(128 ln(4096 / (32*2pi)) / (2 ln 1e4)) = floor(20.94) = 20; high = ceil(45.027) = 46
    low, high = yarn_correction_range(cfg, D, 1e4)
    assert (float(low), float(high)) == (20.0, 46.0)
    exact = RopeConfig(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, truncate=False)
    raw = yarn_correction_range(exact, D, 1e4)
    np.testing.assert_allclose(raw, [20.9445, 45.0269], atol=1e-3)
    inv, temp = rope_frequencies(cfg, D)
    assert math.isclose(temp, 0.1 * math.log(8) + 1, rel_tol=1e-12)  # 1.2079
    np.testing.assert_allclose(inv[[0, 20]], [_default(0), _default(20)], rtol=1e-6)  # extrapolated
    np.testing.assert_allclose(inv[[46, 63]], [_default(46) / 8, _default(63) / 8], rtol=1e-6)  # interpolated
    ramp = (33 - 20) / 26  # 0.5: halfway between the two
    np.testing.assert_allclose(inv[33], _default(33) * (ramp / 8 + (1 - ramp)), rtol=1e-6)


def test_yarn_mscale_ratio_and_explicit_attention_factor():
    kw = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096)
    _, t = rope_frequencies(RopeConfig(mscale=0.707, mscale_all_dim=1.0, **kw), D)
    assert math.isclose(t, (0.0707 * math.log(40) + 1) / (0.1 * math.log(40) + 1), rel_tol=1e-12)
    assert rope_frequencies(RopeConfig(attention_factor=1.5, **kw), D)[1] == 1.5


def test_llama3_bands_by_hand():
    cfg = RopeConfig(rope_type="llama3", theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
    inv, _ = rope_frequencies(cfg, D)
    base = lambda i: _default(i, 5e5)
    # wavelength 2pi/inv: < 8192/4 = 2048 for i <= 28 (kept), > 8192 for i >= 36 (divided by 8)
    np.testing.assert_allclose(inv[[0, 28]], [base(0), base(28)], rtol=1e-6)
    np.testing.assert_allclose(inv[[36, 63]], [base(36) / 8, base(63) / 8], rtol=1e-6)
    wavelen = 2 * math.pi / base(30)  # 3138: medium band, smooth = (8192/3138 - 1) / 3 = 0.537
    smooth = (8192 / wavelen - 1) / 3
    assert 0.5 < smooth < 0.6
    np.testing.assert_allclose(inv[30], (1 - smooth) * base(30) / 8 + smooth * base(30), rtol=1e-6)


def test_traced_theta_matches_static():
    cfg = RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048)
    static, _ = rope_frequencies(cfg, 64)
    traced = jax.jit(lambda b: rope_frequencies(cfg, 64, theta=b)[0])
    np.testing.assert_allclose(traced(1e4), static, rtol=2e-6)


HF_CONFIGS = [
    {"rope_theta": 10000.0, "max_position_embeddings": 4096},
    {"rope_theta": 10000.0, "max_position_embeddings": 4096,
     "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_theta": 10000.0, "max_position_embeddings": 4096,
     "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_theta": 1e6, "max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": True}},
    {"rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
]


@pytest.mark.parametrize("hf", HF_CONFIGS)
def test_hf_round_trip(hf):
    cfg = RopeConfig.from_hf(hf)
    back = cfg.to_hf()
    assert back["rope_theta"] == hf["rope_theta"]
    want = dict(hf.get("rope_scaling") or {}) or None
    if want is not None:
        want["rope_type"] = want.pop("type", None) or want["rope_type"]
        assert {k: back["rope_scaling"][k] for k in want} == want
    else:
        assert back["rope_scaling"] is None
    assert RopeConfig.from_hf({**hf, **back}) == cfg


def test_from_hf_defaults_follow_hf():
    dyn = RopeConfig.from_hf(HF_CONFIGS[2])
    assert dyn.original_max_position_embeddings == 4096  # HF dynamic measures against max_position_embeddings
    yarn = RopeConfig.from_hf({"max_position_embeddings": 32768, "rope_scaling": {
        "rope_type": "yarn", "original_max_position_embeddings": 4096}})
    assert yarn.factor == 8.0 and yarn.theta == 10000.0
    ntk = RopeConfig(rope_type="ntk", factor=8.0)
    np.testing.assert_allclose(rope_frequencies(RopeConfig.from_hf(ntk.to_hf(head_dim=D)), D)[0],
                               rope_frequencies(ntk, D)[0], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_type="ntk2"), "rope_type"),
    (dict(rope_type="linear", factor=0.0), "factor"),
    (dict(rope_type="linear", factor=-2.0), "factor"),
    (dict(theta=-1.0), "theta"),
    (dict(rope_type="yarn", factor=2.0), "original_max_position_embeddings"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=64, beta_fast=1, beta_slow=2),
     "beta"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=64, low_freq_factor=4.0,
          high_freq_factor=1.0), "high_freq_factor"),
    (dict(layout="diagonal"), "layout"),
    (dict(attention_factor=0.0), "attention_factor"),
    (dict(logn_length=1), "logn_length"),
    (dict(logn_length=2048.0), "logn_length"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig(**kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="not supported"):
        RopeConfig.from_hf({"rope_scaling": {"type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        RopeConfig.from_hf({"partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="not understood"):
        RopeConfig.from_hf({"rope_scaling": {"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}})
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(RopeConfig(), 63)
    with pytest.raises(ValueError, match="head_dim"):
        make_position_fn(RopeConfig(), 7)
    x = jnp.ones((1, 4, 2, 8))
    inv, _ = rope_frequencies(RopeConfig(), 8)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, jnp.arange(5), inv)
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(x, jnp.arange(4), inv[:3])
    with pytest.raises(TypeError, match="integer"):
        apply_rope(x, jnp.arange(4.0), inv)


def _dots(q, k, m, n, inv, layout):
    qr = apply_rope(q, jnp.asarray(m), inv, layout=layout)
    kr = apply_rope(k, jnp.asarray(n), inv, layout=layout)
    return jnp.einsum("btnh,btnh->btn", qr, kr)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("traced", [False, True])
def test_norms_preserved_and_dot_depends_only_on_offset(layout, traced):
    rng = np.random.default_rng(0)
    t, h = 64, 64
    q = jnp.asarray(rng.standard_normal((1, t, 2, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, t, 2, h)), jnp.float32)
    inv, _ = rope_frequencies(RopeConfig(theta=5e5), h)
    inv = jnp.asarray(inv) if traced else inv
    m = rng.integers(0, 4096, t)
    n = m - rng.integers(0, 4096, t)
    shift = rng.integers(0, 4_000_000, t)  # random offsets up to 4M
    fn = jax.jit(lambda a, b: _dots(q, k, a, b, inv, layout)) if traced else (
        lambda a, b: _dots(q, k, a, b, inv, layout))
    base = fn(m, n)
    moved = fn(m + shift, n + shift)
    np.testing.assert_allclose(moved, base, rtol=1e-3, atol=1e-3 * float(jnp.abs(base).max()))
    rel = jnp.abs(moved - base).max() / jnp.abs(base).max()
    assert rel < 1e-4  # exact phase reduction: far below the 1e-3 requirement
    norms = jnp.linalg.norm(apply_rope(q, jnp.asarray(m + shift), inv, layout=layout), axis=-1)
    np.testing.assert_allclose(norms, jnp.linalg.norm(q, axis=-1), rtol=1e-5)


def test_precise_angles_are_exact_mod_2pi_and_hf_mode_is_plain_float32():
    inv, _ = rope_frequencies(RopeConfig(theta=3e8), D)
    pos = np.array([0, 7, 4_000_000, 123_456_789, 2**31 - 1])
    exact = (pos[:, None] * inv.astype(np.float64)) % (2 * math.pi)
    for angles in (rope_angles(pos, inv), jax.jit(rope_angles)(pos, jnp.asarray(inv))):
        err = (np.asarray(angles, np.float64) - exact + math.pi) % (2 * math.pi) - math.pi
        assert np.abs(err).max() < 2e-6
    plain = rope_angles(pos, inv, precise=False)
    np.testing.assert_array_equal(plain, pos.astype(np.float32)[:, None] * inv)


def test_layouts_hand_values_and_dtype():
    inv = np.array([1.0, 0.5], np.float32)
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    half = apply_rope(x, jnp.array([1]), inv)[0, 0, 0]
    c0, s0, c1, s1 = math.cos(1), math.sin(1), math.cos(0.5), math.sin(0.5)
    # half: pairs (x0, x2) at angle 1 and (x1, x3) at angle 0.5
    np.testing.assert_allclose(half, [c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + s0, 4 * c1 + 2 * s1], rtol=1e-6)
    inter = apply_rope(x, jnp.array([1]), inv, layout="interleaved", attention_scale=2.0)[0, 0, 0]
    # interleaved: pairs (x0, x1) at angle 1 and (x2, x3) at angle 0.5, times the attention scale 2
    want = 2 * np.array([c0 - 2 * s0, 2 * c0 + s0, 3 * c1 - 4 * s1, 4 * c1 + 3 * s1])
    np.testing.assert_allclose(inter, want, rtol=1e-6)
    xb = jnp.ones((2, 3, 1, 8), jnp.bfloat16)
    inv8 = rope_frequencies(RopeConfig(), 8)[0]
    assert apply_rope(xb, jnp.zeros((2, 3), jnp.int32), inv8).dtype == jnp.bfloat16


def test_position_fn_rotates_q_and_k_and_dynamic_uses_max_position():
    cfg = RopeConfig(rope_type="dynamic", factor=2.0, original_max_position_embeddings=16)
    fn = make_position_fn(cfg, 8)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 40, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 40, 2, 8)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    qr, kr = jax.jit(fn)(q, k, pos)
    inv, _ = rope_frequencies(cfg, 8, seq_len=40)
    np.testing.assert_allclose(qr, apply_rope(q, pos, inv), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kr, apply_rope(k, pos, inv), rtol=1e-5, atol=1e-6)


def test_logn_scales_queries_past_the_training_length_only():
    """Log-n attention: q at position p is multiplied by log(p + 1) / log(L) once p + 1 > L; k never."""
    base = RopeConfig(rope_type="ntk", factor=4.0)
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 40, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 40, 2, 8)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(40) * 7, (2, 40))  # 0 ... 273: both sides of L = 16
    q0, k0 = jax.jit(make_position_fn(base, 8))(q, k, pos)
    ql, kl = jax.jit(make_position_fn(dataclasses.replace(base, logn_length=16), 8))(q, k, pos)
    want = np.maximum(1.0, np.log(np.arange(40) * 7 + 1.0) / np.log(16.0))
    assert want[2] == 1.0 and want[-1] > 2.0  # p = 14 is inside, p = 273 far outside
    np.testing.assert_allclose(ql, q0 * want[None, :, None, None], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(kl, k0)
    q1, _ = make_position_fn(RopeConfig(logn_length=16), 8)(q, k, jnp.arange(40) * 7)  # [T] positions
    np.testing.assert_allclose(q1,
                               make_position_fn(RopeConfig(), 8)(q, k, pos)[0] * want[None, :, None, None],
                               rtol=1e-5, atol=1e-6)


def test_logn_scale_rejects_a_bad_length():
    from selmerge_jax.positional import logn_scale

    with pytest.raises(ValueError, match="length=1: must be an int >= 2"):
        logn_scale(jnp.arange(4), 1)


def test_logn_has_no_hf_export():
    with pytest.raises(ValueError, match="logn_length"):
        RopeConfig(logn_length=4096).to_hf()


HF_PARITY = [
    {"rope_theta": 10000.0, "max_position_embeddings": 4096},
    {"rope_theta": 1e4, "max_position_embeddings": 2048, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_theta": 1e4, "max_position_embeddings": 2048, "rope_scaling": {"type": "dynamic", "factor": 4.0}},
    {"rope_theta": 1e6, "max_position_embeddings": 8192, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}},
    {"rope_theta": 1e4, "max_position_embeddings": 8192, "rope_scaling": {
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 2048, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False}},
    {"rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
]


@pytest.mark.hf
@pytest.mark.parametrize("hf", HF_PARITY,
                         ids=["default", "linear", "dynamic", "yarn", "yarn_mscale", "llama3"])
def test_matches_transformers_rotary_embedding(hf):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    copy = {k: dict(v) if isinstance(v, dict) else v for k, v in hf.items()}  # HF edits dicts in place
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, **copy)
    emb = LlamaRotaryEmbedding(hf_cfg)
    pos = torch.arange(0, 9000, 7)[None]  # beyond max_position_embeddings: dynamic NTK rescales
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, pos.shape[1], 64, generator=gen)  # HF layout: [B, heads, T, H]
    with torch.no_grad():
        cos, sin = emb(x, pos)
        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    inv, scale = make_position_fn(RopeConfig.from_hf(hf), 64).frequencies(jnp.asarray(pos.numpy()))
    np.testing.assert_allclose(inv, emb.inv_freq.numpy(), rtol=2e-6)
    assert scale == pytest.approx(emb.attention_scaling, rel=1e-6)
    xj, pj = jnp.asarray(x.numpy().transpose(0, 2, 1, 3)), jnp.asarray(pos.numpy())
    # Same frequencies -> same rotation: layout, temperature and float32 angles are HF's exactly.
    same = apply_rope(xj, pj, emb.inv_freq.numpy(), attention_scale=scale, precise=False)
    np.testing.assert_allclose(np.asarray(same).transpose(0, 2, 1, 3), want.numpy(), rtol=1e-5, atol=1e-5)
    # Our own frequencies are correctly rounded; HF's float32 pow is 1-2 ulp off, i.e. ~1e-3 rad at 9000.
    for precise in (False, True):
        got = np.asarray(make_position_fn(RopeConfig.from_hf(hf), 64, precise=precise).rotate(xj, pj))
        np.testing.assert_allclose(got.transpose(0, 2, 1, 3), want.numpy(), atol=5e-3)
