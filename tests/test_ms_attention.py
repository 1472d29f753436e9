"""Select-and-merge attention against the dense oracle, a brute-force selection rule and a masked dense
twin."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from selmerge_jax.attention import MSAttentionConfig, dense_attention, select_regions
from selmerge_jax.attention import ms_attention as _ms_attention
from selmerge_jax.attention.ms import pad_to_multiple

# Jitted once per (config, shape): eager op-by-op dispatch of the group loops dominates CPU test time.
ms_attention = jax.jit(_ms_attention, static_argnums=3, static_argnames=("return_plan",))


def _qkv(key, b=2, t=128, n=4, kh=2, h=8, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (b, t, n, h), dtype), jax.random.normal(kk, (b, t, kh, h), dtype),
            jax.random.normal(kv, (b, t, kh, h), dtype))


# ----------------------------------------------------------------------------------------------- brute force


def _brute_force_plan(q, k, cfg: MSAttentionConfig, t_valid: int):
    """The docs/ARCHITECTURE.md selection rule, written as plain loops over groups and members (numpy)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, h = q.shape
    kh, w, merge, m = k.shape[2], cfg.block_size, cfg.merge, cfg.num_selected
    r = t // w
    pos = np.arange(t).reshape(r, w)
    keep = (pos < t_valid)[None, :, :, None, None]
    qbar = (q.reshape(b, r, w, n, h) * keep).sum(2) / np.maximum(keep.sum(2), 1)
    kbar = (k.reshape(b, r, w, kh, h) * keep).sum(2) / np.maximum(keep.sum(2), 1)
    g = n // kh
    if cfg.selection_heads == "kv":
        qbar, p = qbar.reshape(b, r, kh, g, h).mean(3), kh
    else:
        kbar, p = np.repeat(kbar, g, axis=2), n
    n_valid_regions = -(-t_valid // w)
    out = np.full((b, p, r // merge, max(m, 1)), -1)
    for bi, pi, grp in itertools.product(range(b), range(p), range(r // merge)):
        gs = grp * merge
        cands = [j for j in range(r) if (j < gs if cfg.causal else not gs <= j < gs + merge)]
        forced = [j for j in cands if j < cfg.sink]
        if len(cands) <= m:
            chosen = cands
        else:
            members = [gs - 1] if cfg.selection_source == "previous" else range(gs, gs + merge)
            prio = {j: -1 for j in forced}
            for i, a in enumerate(members):
                if a >= n_valid_regions:
                    continue
                free = [j for j in cands if j not in forced]
                scores = [qbar[bi, a, pi] @ kbar[bi, j, pi] for j in free]
                order = sorted(range(len(free)), key=lambda x: (-scores[x], free[x]))[:m]
                for rank, x in enumerate(order):
                    prio[free[x]] = min(prio.get(free[x], 1 << 30), rank * merge + i)
            chosen = sorted(prio, key=lambda j: prio[j])[:m]
        chosen = sorted(chosen)
        out[bi, pi, grp, :len(chosen)] = chosen
    return out


CONFIGS = [
    MSAttentionConfig(selection_source="group", block_size=8, top_k=4, merge=1),
    MSAttentionConfig(selection_source="group", block_size=8, top_k=4, merge=2),
    MSAttentionConfig(block_size=8, top_k=6, merge=2, selection_source="previous"),
    MSAttentionConfig(selection_source="group", block_size=4, top_k=6, merge=3, selection_heads="kv", sink=1),
    MSAttentionConfig(selection_source="group", block_size=8, top_k=4, merge=2, causal=False),
    MSAttentionConfig(block_size=8, top_k=6, merge=2, selection_heads="kv", selection_source="previous",
                      sink=2),
]


@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=lambda c: f"W{c.block_size}k{c.top_k}m{c.merge}{c.selection_source[0]}"
                         f"{c.selection_heads[0]}s{c.sink}{'c' if c.causal else 'nc'}")
def test_plan_matches_brute_force_rule(cfg, key):
    t = 96 if cfg.causal else 96 - 96 % cfg.group_tokens
    q, k, _ = _qkv(key, t=t)
    plan = select_regions(q, k, cfg, num_valid_tokens=t)
    np.testing.assert_array_equal(np.asarray(plan.kv_regions), _brute_force_plan(q, k, cfg, t))


def test_plan_with_internal_padding_ignores_padded_members(key):
    cfg = MSAttentionConfig(selection_source="group", block_size=8, top_k=4, merge=4)
    q, k, _ = _qkv(key, t=100)
    qp, kp = pad_to_multiple(q, 32), pad_to_multiple(k, 32)
    plan = select_regions(qp, kp, cfg, num_valid_tokens=100)
    np.testing.assert_array_equal(np.asarray(plan.kv_regions), _brute_force_plan(qp, kp, cfg, 100))


def test_ties_go_to_lower_region_index(key):
    cfg = MSAttentionConfig(selection_source="group", block_size=4, top_k=3, merge=1)
    q, _, _ = _qkv(key, b=1, t=64, n=2, kh=2)
    k = jnp.ones((1, 64, 2, 8))  # every region summary identical: every score ties
    plan = select_regions(q, k, cfg)
    regions = np.asarray(plan.kv_regions)[0, :, 5:]
    np.testing.assert_array_equal(regions, np.broadcast_to([0, 1], regions.shape))
    again = select_regions(q, k, cfg)
    np.testing.assert_array_equal(np.asarray(again.kv_regions), np.asarray(plan.kv_regions))


# ----------------------------------------------------------------------------------------- dense equality


@pytest.mark.parametrize("n,kh,source,heads,t", [
    (4, 4, "group", "query", 128), (4, 2, "previous", "kv", 117), (6, 1, "group", "kv", 117),
    (4, 2, "previous", "query", 128)])
def test_equals_dense_when_budget_covers_sequence(n, kh, source, heads, t, key):
    q, k, v = _qkv(key, t=t, n=n, kh=kh)
    for centroids in (False, True):
        cfg = MSAttentionConfig(block_size=16, top_k=8, merge=2, selection_source=source,
                                selection_heads=heads,
                                centroids=centroids)
        np.testing.assert_allclose(ms_attention(q, k, v, cfg), dense_attention(q, k, v), atol=1e-5)


def test_non_causal_equals_dense_when_budget_covers_sequence(key):
    q, k, v = _qkv(key, t=64)
    cfg = MSAttentionConfig(selection_source="group", block_size=8, top_k=8, merge=2, causal=False)
    np.testing.assert_allclose(ms_attention(q, k, v, cfg), dense_attention(q, k, v, causal=False), atol=1e-5)


# --------------------------------------------------------------------------- masked dense twin of the plan


def _plan_mask(plan, t, n):
    """``bool [B, N, T, T]``: exactly the (query, key) pairs the plan allows (selected + causal local)."""
    regions = np.asarray(plan.kv_regions)
    valid = np.asarray(plan.valid_mask())
    b, p, q_groups, _ = regions.shape
    w, lt = plan.block_size, plan.group_tokens
    mask = np.zeros((b, p, t, t), bool)
    for bi, pi, grp in itertools.product(range(b), range(p), range(q_groups)):
        rows = slice(grp * lt, (grp + 1) * lt)
        for idx, ok in zip(regions[bi, pi, grp], valid[bi, pi, grp]):
            if ok:
                mask[bi, pi, rows, idx * w:(idx + 1) * w] = True
        local = np.tril(np.ones((lt, lt), bool)) if plan.causal else np.ones((lt, lt), bool)
        mask[bi, pi, rows, rows] |= local
    return np.repeat(mask, n // p, axis=1)


def _masked_dense(q, k, v, mask):
    g = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(q.shape[-1])
    s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), vv)


@pytest.mark.parametrize("cfg", CONFIGS[:4] + CONFIGS[5:], ids=str)
def test_matches_masked_dense_twin_forward_and_gradients(cfg, key):
    t = cfg.group_tokens * (96 // cfg.group_tokens)
    q, k, v = _qkv(key, t=t)
    plan = select_regions(q, k, cfg)
    mask = jnp.asarray(_plan_mask(plan, t, q.shape[2]))
    loss_ms = lambda q, k, v: jnp.sum(jnp.sin(ms_attention(q, k, v, cfg)))
    loss_ref = lambda q, k, v: jnp.sum(jnp.sin(_masked_dense(q, k, v, mask)))
    np.testing.assert_allclose(ms_attention(q, k, v, cfg), _masked_dense(q, k, v, mask), atol=1e-5)
    for g_ms, g_ref in zip(jax.grad(loss_ms, (0, 1, 2))(q, k, v), jax.grad(loss_ref, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_ms, g_ref, atol=1e-4)


def test_selected_groups_attend_exactly_budget_tokens(key):
    cfg = MSAttentionConfig(selection_source="group", block_size=8, top_k=5, merge=1)
    q, k, _ = _qkv(key, t=160)
    plan = select_regions(q, k, cfg)
    tokens = np.asarray(plan.attended_tokens())  # [B, P, Q]
    for grp in range(plan.num_groups):
        expect = min(grp, cfg.num_selected) * cfg.block_size  # dense groups see all earlier regions
        assert (tokens[:, :, grp] == expect).all(), (grp, tokens[:, :, grp])
    mask = _plan_mask(plan, 160, q.shape[2])
    per_query = mask.sum(-1)  # [B, N, T]
    local = np.arange(160) % cfg.block_size + 1
    late = slice(cfg.num_selected * cfg.block_size, None)
    assert (per_query[..., late] == cfg.num_selected * cfg.block_size + local[late]).all()


def test_centroids_add_log_w_weighted_mean_tokens(key):
    cfg = MSAttentionConfig(selection_source="group", block_size=8, top_k=3, merge=1, centroids=True)
    q, k, v = _qkv(key, b=1, t=64, n=2, kh=2)
    out, plan = ms_attention(q, k, v, cfg, return_plan=True)
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    mask = _plan_mask(plan, 64, 2)[0]  # [N, T, T]
    kc, vc = k[0].reshape(8, 8, 2, 8).mean(1), v[0].reshape(8, 8, 2, 8).mean(1)  # [R, K, H]
    want = np.zeros((64, 2, 8))
    for n_, t_ in itertools.product(range(2), range(64)):
        grp = t_ // 8
        sel = {j // 8 for j in np.nonzero(mask[n_, t_])[0] if j // 8 < grp}
        cents = [j for j in range(grp) if j not in sel]
        keys = np.concatenate([k[0, mask[n_, t_], n_], kc[cents, n_]])
        vals = np.concatenate([v[0, mask[n_, t_], n_], vc[cents, n_]])
        logits = keys @ q[0, t_, n_] / np.sqrt(8)
        logits[mask[n_, t_].sum():] += np.log(8)
        weights = np.exp(logits - logits.max())  # numpy: jax.nn.softmax compiled anew for each row's length
        want[t_, n_] = weights / weights.sum() @ vals
    np.testing.assert_allclose(out[0], want, atol=1e-5)


# -------------------------------------------------------------------------------------------- causality


def _perturb_from(x, t, key):
    return x.at[:, t:].add(jax.random.normal(key, x[:, t:].shape))


@pytest.mark.parametrize("seed", range(4))
def test_previous_source_is_strictly_causal(seed):
    key = jax.random.PRNGKey(seed)
    cfg = MSAttentionConfig(block_size=4, top_k=4, merge=2, selection_source="previous",
                            centroids=seed % 2 == 1)
    q, k, v = _qkv(key, t=96)
    t = int(jax.random.randint(jax.random.fold_in(key, 1), (), 1, 95))
    base = ms_attention(q, k, v, cfg)
    for i, which in enumerate("qkv"):
        args = [q, k, v]
        args[i] = _perturb_from(args[i], t, jax.random.fold_in(key, 2 + i))
        np.testing.assert_allclose(ms_attention(*args, cfg)[:, :t], base[:, :t], atol=1e-6, err_msg=which)


def test_group_source_is_causal_across_groups_but_not_within(key):
    cfg = MSAttentionConfig(selection_source="group", block_size=4, top_k=4, merge=2)  # groups of 8 tokens
    q, k, v = _qkv(key, t=96)
    base = ms_attention(q, k, v, cfg)
    for t in (40, 48, 80):  # group starts: earlier groups must not change
        for i in range(3):
            args = [q, k, v]
            args[i] = _perturb_from(args[i], t, jax.random.fold_in(key, i))
            np.testing.assert_allclose(ms_attention(*args, cfg)[:, :t], base[:, :t], atol=1e-6)
    # Documented non-causality: changing the later half of a group's queries can change the selection, and so
    # the outputs, of that group's earlier queries.
    changed = False
    for seed in range(8):
        q2 = q.at[:, 52:56].set(30.0 * jax.random.normal(jax.random.PRNGKey(seed), q[:, 52:56].shape))
        changed |= not np.allclose(ms_attention(q2, k, v, cfg)[:, 48:52], base[:, 48:52], atol=1e-6)
    assert changed, "group-mode selection should depend on later queries of the same group"


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("cfg", [MSAttentionConfig(selection_source="group", block_size=4, top_k=3, merge=1),
                                 MSAttentionConfig(selection_source="group", block_size=4, top_k=4, merge=2,
                                                   centroids=True, selection_heads="kv")],
                         ids=["plain", "centroids"])
def test_check_grads(cfg, key):
    q, k, v = _qkv(key, b=1, t=32, n=2, kh=1, h=4, dtype=jnp.float64) if jax.config.jax_enable_x64 else \
        _qkv(key, b=1, t=32, n=2, kh=1, h=4)
    f = lambda q, k, v: ms_attention(q, k, v, cfg)
    check_grads(f, (q, k, v), order=1, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-3)


def test_no_gradient_through_selection(key):
    cfg = MSAttentionConfig(selection_source="group", block_size=4, top_k=3, merge=1)
    q, k, v = _qkv(key, b=1, t=32)
    # selection_q only drives the selection: its gradient is exactly zero
    g = jax.grad(lambda sq: ms_attention(q, k, v, cfg, selection_q=sq).sum())(q)
    assert not jnp.any(g)


def test_jit_compiles_once(key):
    import chex

    cfg = MSAttentionConfig(selection_source="group", block_size=8, top_k=4, merge=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v):
        return ms_attention(q, k, v, cfg)

    q, k, v = _qkv(key, t=64)
    for i in range(3):
        f(q + i, k, v).block_until_ready()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=2, merge=4), "top_k=2 must be >= merge=4"),
    (dict(top_k=6, merge=4), "multiple of merge"),
    (dict(block_size=0), "MSAttentionConfig.block_size=0: must be a positive int"),
    (dict(block_size=-8), "block_size"),
    (dict(merge=0), "merge"),
    (dict(top_k=4, merge=1, sink=4), "sink=4"),
    (dict(top_k=4, merge=1, sink=True), "sink=True"),
    (dict(selection_source="next"), "selection_source='next'"),
    (dict(selection_heads="all"), "selection_heads='all'"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSAttentionConfig(**kwargs)


def test_bad_inputs_raise(key):
    cfg = MSAttentionConfig(selection_source="group", block_size=8, top_k=4, merge=1)
    q, k, v = _qkv(key, t=64, n=4, kh=2)
    with pytest.raises(ValueError, match="rank 4"):
        _ms_attention(q[0], k, v, cfg)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        _ms_attention(q[:, :, :3], k, v, cfg)
    with pytest.raises(TypeError, match="share a dtype"):
        _ms_attention(q.astype(jnp.bfloat16), k, v, cfg)
    with pytest.raises(ValueError, match=r"v \[B, S, K, Hv\] must agree with k \[B, S, K, H\] on B, S and K"):
        _ms_attention(q, k, v[:, :32], cfg)
    with pytest.raises(ValueError, match="self-attention"):
        _ms_attention(q[:, :32], k, v, cfg)
    with pytest.raises(ValueError, match="head dim"):
        _ms_attention(q[..., :4], k, v, cfg)
    with pytest.raises(ValueError, match="non-causal"):
        _ms_attention(q[:, :60], k[:, :60], v[:, :60], MSAttentionConfig(block_size=8, top_k=4, causal=False))


def test_budget_larger_than_sequence_is_dense(key):
    # top_k - merge = 14 regions of budget, only 5 regions in the sequence: every group attends densely.
    q, k, v = _qkv(key, t=40)
    cfg = MSAttentionConfig(selection_source="group", block_size=8, top_k=16, merge=2)
    out, plan = ms_attention(q, k, v, cfg, return_plan=True)
    assert plan.max_selected <= plan.num_regions
    np.testing.assert_allclose(out, dense_attention(q, k, v), atol=1e-5)
