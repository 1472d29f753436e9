"""kernels.selective_decode: the Pallas Triton decode kernel (interpret mode) against its pure-jnp reference,
and ``attend_selected`` through the kernel against its own jnp path (centroids merged by log-sum-exp)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmerge_jax import kvcache
from selmerge_jax.kernels import selective_decode as sd
from selmerge_jax.kernels.selective_decode import selective_decode_reference, selective_decode_triton
from selmerge_jax.kvcache.query_select import attend_selected, build_index

interpreted = functools.partial(selective_decode_triton, interpret=True)


def _inputs(b=2, kh=2, g=4, h=32, c=512, w=32, m=8, seed=0, dtype=jnp.bfloat16, fill=(400, 200)):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, kh, g, h), dtype)
    k = jax.random.normal(ks[1], (b, kh, c, h), dtype)
    v = jax.random.normal(ks[2], (b, kh, c, h), dtype)
    slot = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, kh, c))
    filled = jnp.asarray(fill[:b], jnp.int32)[:, None, None]
    pos = jnp.where(slot < filled, slot, -1)
    count = jnp.where(pos >= 0, jnp.where(slot % 7 == 3, 2.0, 1.0), 0.0)  # some merged slots
    blocks = jnp.sort(jax.vmap(lambda key: jax.random.permutation(key, c // w)[:m])(
        jax.random.split(ks[3], b * kh)).reshape(b, kh, m), -1).astype(jnp.int32)
    q_pos = jnp.asarray(fill[:b], jnp.int32) - 1
    return q, k, v, pos, count, blocks, q_pos, w


def _close(got, want, tol=2e-2):
    for a, r in zip(got, want):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(r))
        ok = np.isfinite(r)
        np.testing.assert_allclose(a[ok], r[ok], rtol=0, atol=tol * max(float(np.abs(r[ok]).max()), 1.0))


@pytest.mark.parametrize("g, h, w, m", [(4, 32, 32, 8), (1, 64, 16, 4), (8, 32, 256, 2), (16, 16, 32, 6)])
def test_kernel_matches_the_reference(g, h, w, m):
    """GQA groups 1-16, head dims 16-64, blocks of 16-256 slots (256: walked in chunks of 128), merged
    slots (count 2), a row whose query sees only part of the cache."""
    args = _inputs(g=g, h=h, w=w, m=m)
    _close(interpreted(*args[:-1], block=args[-1]), selective_decode_reference(*args[:-1], block=args[-1]))


def test_nan_in_empty_slots_and_rows_that_see_nothing():
    q, k, v, pos, count, blocks, q_pos, w = _inputs()
    k = jnp.where((pos < 0)[..., None], jnp.nan, k)
    v = jnp.where((pos < 0)[..., None], jnp.nan, v)
    q_pos = q_pos.at[1].set(-5)  # row 1 sees nothing: output 0, lse -inf
    got = interpreted(q, k, v, pos, count, blocks, q_pos, block=w)
    want = selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w)
    assert np.isfinite(np.asarray(got[0])).all()
    np.testing.assert_array_equal(np.asarray(got[0][1]), 0.0)
    assert np.isneginf(np.asarray(got[1][1])).all()
    _close(got, want)


def _centroids(q, rows, r, seed=1, nan_pad=False):
    """A centroid store of ``rows`` rows over ``r`` blocks (rows past ``r`` empty), some merged counts, some
    centroids newer than the query."""
    b, kh, _, h = q.shape
    ks = jax.random.split(jax.random.key(seed), 3)
    ck = jax.random.normal(ks[0], (b, kh, rows, h), q.dtype)
    cv = jax.random.normal(ks[1], (b, kh, rows, h), q.dtype)
    row = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32), (b, kh, rows))
    n = jnp.where(row < r, jax.random.randint(ks[2], (b, kh, rows), 0, 40), 0).astype(jnp.float32)
    cpos = jnp.where(n > 0, row * 32 + 31, -1)
    if nan_pad:
        ck, cv = (jnp.where((n == 0)[..., None], jnp.nan, x) for x in (ck, cv))
    return ck, cv, cpos, n


@pytest.mark.parametrize("rows, r", [(16, 16), (384, 300), (1024, 16)])
def test_kernel_with_centroids_matches_the_reference(rows, r):
    """The centroid programs (1, 3 and 8 per kv head; tiles of 16 and 128 rows) and the selected blocks in
    one softmax: the selected blocks' centroids hidden, empty and future centroids unseen, NaN in empty
    centroid rows harmless."""
    q, k, v, pos, count, blocks, q_pos, w = _inputs(c=512, w=32, m=4)
    cent = _centroids(q, rows, r, nan_pad=True)
    got = interpreted(q, k, v, pos, count, blocks, q_pos, block=w, centroids=cent)
    want = selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w, centroids=cent)
    assert np.isfinite(np.asarray(got[0])).all()
    _close(got, want)
    alone = selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w)
    assert np.all(np.asarray(want[1]) > np.asarray(alone[1]))  # the centroids carry mass


def test_reference_hides_the_selected_blocks_centroids():
    """A centroid whose block is selected adds nothing: the same output as with its count set to 0."""
    q, k, v, pos, count, blocks, q_pos, w = _inputs(c=512, w=32, m=4)
    ck, cv, cpos, n = _centroids(q, 16, 16)
    hidden = (jnp.arange(16)[:, None] == blocks[:, :, None, :]).any(-1)
    a = selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w, centroids=(ck, cv, cpos, n))
    b = selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w,
                                   centroids=(ck, cv, cpos, jnp.where(hidden, 0.0, n)))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_index_is_stored_as_the_kernel_reads_it():
    """Cache dtype, rows padded to what the kernel tiles (empty: count 0, position -1), the block kept."""
    from selmerge_jax.kernels.selective_decode.pallas_triton import centroid_tile
    from selmerge_jax.kvcache.query_select import index_rows

    assert [index_rows(r) for r in (1, 8, 16, 17, 128, 129, 1024, 1025, 4097)] == \
        [16, 16, 16, 32, 128, 256, 1024, 2048, 5120]
    assert all(centroid_tile(index_rows(r)) for r in (1, 17, 129, 1025, 4097))
    assert centroid_tile(24) == 0 and centroid_tile(200) == 0
    _, k, v, pos, count, _, _, w = _inputs(c=256, w=32)
    cache = kvcache.KVCache(k=k, v=v, pos=pos, count=count, score=jnp.zeros_like(count),
                            length=jnp.int32(400), dropped=jnp.int32(0))
    index = build_index(cache, w)
    assert index.block == w and index.k_mean.dtype == k.dtype and index.k_mean.shape[2] == 16
    np.testing.assert_array_equal(np.asarray(index.n[..., 8:]), 0.0)
    np.testing.assert_array_equal(np.asarray(index.newest[..., 8:]), -1)
    with pytest.raises(ValueError, match=r"index\.block"):
        attend_selected(cache, jnp.zeros((2, 1, 8, 32), jnp.bfloat16), jnp.zeros((2, 1), jnp.int32),
                        block=16, top_m=2, index=index)


def test_auto_runs_the_kernel_only_on_a_gpu_and_where_it_tiles():
    assert sd.resolve("auto", (1, 8, 4, 128), 128) == ("pallas_triton" if jax.default_backend() == "gpu"
                                                        else "xla")
    assert not sd.pallas_triton.tiles((1, 2, 2, 8), 16)  # head dim 8: below Triton's smallest dot
    assert not sd.pallas_triton.tiles((1, 2, 32, 64), 64)  # 32 heads per kv head: more than one tile
    assert not sd.pallas_triton.tiles((1, 2, 4, 64), 48)
    args = _inputs()
    got = sd.selective_decode(*args[:-1], block=args[-1], implementation="auto")
    if jax.default_backend() != "gpu":  # the reference itself, bit for bit
        want = selective_decode_reference(*args[:-1], block=args[-1])
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input_is_named():
    q, k, v, pos, count, blocks, q_pos, w = _inputs()
    with pytest.raises(ValueError, match="block"):
        selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=48)
    with pytest.raises(ValueError, match="blocks"):
        selective_decode_reference(q, k, v, pos, count, blocks[0], q_pos, block=w)
    with pytest.raises(ValueError, match="q_pos"):
        selective_decode_reference(q, k, v, pos, count, blocks, q_pos[:1], block=w)
    with pytest.raises(ValueError, match=r"blocks\.dtype"):
        selective_decode_reference(q, k, v, pos, count, blocks.astype(jnp.float32), q_pos, block=w)
    with pytest.raises(ValueError, match=r"k\.dtype"):
        selective_decode_reference(q, k.astype(jnp.int32), v, pos, count, blocks, q_pos, block=w)
    with pytest.raises(ValueError, match="implementation"):
        sd.selective_decode(q, k, v, pos, count, blocks, q_pos, block=w, implementation="cuda")
    with pytest.raises(ValueError, match="kernel"):
        kvcache.DecodeSelection(block=8, top_m=2, kernel="triton")
    with pytest.raises(NotImplementedError, match="GPU"):
        selective_decode_triton(q, k, v, pos, count, blocks, q_pos, block=w)  # natively, off a GPU
    cent = _centroids(q, 16, 16)
    with pytest.raises(ValueError, match="centroids"):
        selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w, centroids=cent[:3])
    with pytest.raises(ValueError, match=r"centroids \(cpos, ccount\)"):
        selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w,
                                   centroids=(*cent[:2], cent[2][..., :8], cent[3]))
    with pytest.raises(ValueError, match=r"centroids cpos\.dtype"):  # in BlockIndex order: n before newest
        selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w,
                                   centroids=(*cent[:2], cent[3], cent[2]))
    with pytest.raises(ValueError, match="centroids rows"):  # 16 blocks, 8 centroids
        selective_decode_reference(q, k, v, pos, count, blocks, q_pos, block=w,
                                   centroids=tuple(x[:, :, :8] for x in cent))
    with pytest.raises(NotImplementedError, match="centroid stores"):
        interpreted(q, k, v, pos, count, blocks, q_pos, block=w, centroids=tuple(
            jnp.concatenate([x, x[:, :, :8]], axis=2) for x in cent))  # 24 rows: no tile


@pytest.mark.parametrize("centroids", [True, False])
def test_attend_selected_through_the_kernel_equals_its_jnp_path(monkeypatch, centroids):
    """The step's blocks and the other blocks' centroids through one kernel call equal one softmax over the
    gathered slots and the centroids; a row with an empty cache gives 0 both ways."""
    import selmerge_jax.kvcache.query_select as qs

    _, k, v, pos, count, _, _, w = _inputs(b=3, c=256, fill=(200, 97, 0))
    q = jax.random.normal(jax.random.key(9), (3, 1, 8, 32), jnp.bfloat16)
    cache = kvcache.KVCache(k=k, v=v, pos=pos, count=count, score=jnp.zeros_like(count),
                            length=jnp.int32(200), dropped=jnp.int32(0))
    q_positions = jnp.asarray([[199], [96], [0]], jnp.int32)
    kw = dict(block=w, top_m=3, centroids=centroids, index=build_index(cache, w))
    want = attend_selected(cache, q, q_positions, kernel="xla", **kw)
    calls = []
    monkeypatch.setattr(qs, "selective_decode",
                        lambda *a, implementation, **k: calls.append(implementation) or interpreted(*a, **k))
    got = attend_selected(cache, q, q_positions, kernel="pallas_triton", **kw)
    assert calls == ["pallas_triton"]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=0)
    np.testing.assert_array_equal(np.asarray(got[2], np.float32), 0.0)


@pytest.mark.gpu
def test_native_kernel_matches_the_reference_at_the_8b_shape():
    """The native build (Llama-3-8B's decode shape: 8 kv heads of 4 query heads, head dim 128, 32 blocks of
    128 slots, batch 2 with ragged fills) against the reference, on a power-of-two cache and on one of
    16K + 128 slots (what ``generate`` allocates: prompt + new tokens rounded up to a block); bitwise
    deterministic."""
    for c in (16384, 16512):
        args = _inputs(b=2, kh=8, g=4, h=128, c=c, w=128, m=32, fill=(16000, 9000))
        got = selective_decode_triton(*args[:-1], block=args[-1])
        _close(got, selective_decode_reference(*args[:-1], block=args[-1]))
        again = selective_decode_triton(*args[:-1], block=args[-1])
        for a, b in zip(got, again):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
def test_native_attend_selected_with_centroids_equals_its_xla_path():
    """A decode step through the native kernel with the centroids merged by log-sum-exp, against one softmax
    over the gathered slots and the centroids (GQA 8 x 4, head dim 128, a 16,512-slot cache)."""
    _, k, v, pos, count, _, _, w = _inputs(b=2, kh=8, g=4, h=128, c=16512, w=128, m=32, fill=(16000, 9000))
    q = jax.random.normal(jax.random.key(4), (2, 1, 32, 128), jnp.bfloat16)
    cache = kvcache.KVCache(k=k, v=v, pos=pos, count=count, score=jnp.zeros_like(count),
                            length=jnp.int32(16000), dropped=jnp.int32(0))
    q_positions = jnp.asarray([[15999], [8999]], jnp.int32)
    kw = dict(block=w, top_m=32, centroids=True, index=build_index(cache, w))
    got = attend_selected(cache, q, q_positions, kernel="pallas_triton", **kw)
    want = attend_selected(cache, q, q_positions, kernel="xla", **kw)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=0)


@pytest.mark.gpu
def test_native_kernel_with_centroids_matches_the_reference():
    """The fused step at the 8B decode shape: 32 selected blocks and a centroid store laid out as a 512K
    cache's index is (5,120 rows: 8 centroid programs per kv head; here its rows past the 128 blocks of
    this cache carry counts too, attended by the same rule) and a small one (256 rows)."""
    args = _inputs(b=2, kh=8, g=4, h=128, c=16384, w=128, m=32, fill=(16000, 9000))
    for rows, r in ((256, 129), (5120, 4097)):
        cent = _centroids(args[0], rows, r, nan_pad=True)
        got = selective_decode_triton(*args[:-1], block=args[-1], centroids=cent)
        _close(got, selective_decode_reference(*args[:-1], block=args[-1], centroids=cent))
