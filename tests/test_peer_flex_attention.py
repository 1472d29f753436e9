"""The FlexAttention peer of bench_attention.py attends exactly the project's block pattern: its BlockMask,
built from a spec's plan, gives the block-sparse reference's output (PyTorch's unfused CPU path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from experiment_scripts import load_script

torch = pytest.importorskip("torch")
pytest.importorskip("torch.nn.attention.flex_attention")

from selmerge_jax.kernels.block_sparse_attention import block_sparse_attention_reference  # noqa: E402
from selmerge_jax.kernels.block_sparse_attention.specs import AttentionSpec, get_spec  # noqa: E402

peer = load_script("benchmarks/peer_flex_attention.py")


@pytest.mark.parametrize("spec", [
    get_spec("tiny_g4_h64_w64"),  # GQA 4, ragged rows (-1 entries mid-row after the sort: padding last)
    get_spec("tiny_g1_h128_w128"),
    AttentionSpec(name="gqa2_b2", seq_len=256, q_heads=4, kv_heads=2, head_dim=32, block_size=32, selected=3,
                  batch=2, dtype="float32", ragged=0.5),
])
def test_flex_block_mask_attends_the_plan(spec):
    plan = peer.spec_plan(spec)
    q, k, v, _ = peer.inputs(spec, "cpu", torch.float32)
    timed, exact = (peer.block_mask(plan, spec.q_heads, "cpu", exact=e) for e in (False, True))
    # The timed mask lists the same blocks; the unfused CPU path needs the pattern in its mask function.
    np.testing.assert_array_equal(timed.to_dense().numpy(), exact.to_dense().numpy())
    np.testing.assert_array_equal(exact.to_dense().numpy(), _plan_pattern(plan, spec.q_heads))
    with torch.no_grad():
        theirs = peer.attend(q, k, v, exact).numpy()
    to_jax = lambda x: jnp.asarray(x.numpy()).transpose(0, 2, 1, 3)  # [B, heads, T, H] -> [B, T, heads, H]
    ours = block_sparse_attention_reference(to_jax(q), to_jax(k), to_jax(v), plan)
    np.testing.assert_allclose(theirs.transpose(0, 2, 1, 3), np.asarray(ours), atol=2e-5, rtol=2e-5)


def _plan_pattern(plan, q_heads):
    """``int [B, N, Q, Q]``: 1 where query group g attends key block j (its valid regions and itself)."""
    rows = np.repeat(np.asarray(plan.kv_regions), q_heads // plan.kv_regions.shape[1], axis=1)
    b, n, q, _ = rows.shape
    out = np.zeros((b, n, q, q), np.int32)
    for idx in np.ndindex(b, n, q):
        out[idx + (idx[2],)] = 1
        for r in rows[idx]:
            if 0 <= r < idx[2]:
                out[idx + (r,)] = 1
    return out


def test_the_plan_is_the_one_bench_attention_times():
    spec = get_spec("tiny_g4_h64_w64")
    want = spec.make_inputs(jax.random.PRNGKey(peer.PLAN_KEY))[3].kv_regions
    np.testing.assert_array_equal(peer.spec_plan(spec).kv_regions, want)


def test_other_plans_are_refused():
    with pytest.raises(ValueError, match="merge=1, causal"):
        peer.block_mask(peer.spec_plan(get_spec("tiny_g8_merge2_per_head")), 8, "cpu")
