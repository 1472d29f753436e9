"""The grain LM pipeline and the numpy TokenWindows loader: packing, exact resume, shuffling, sharding,
passkey mixing, TFDS end to end."""

import json
import re

import numpy as np
import pytest

# grain is a declared dependency, but the GPU machine's image lacks it (the package is installed there with
# --no-deps): skip this module there rather than fail collection of `pytest -m gpu tests`.
pytest.importorskip("grain")

from selmerge_jax.data import catalog
from selmerge_jax.data.arrays import TokenWindows, tokenize_documents, unigram_entropy
from selmerge_jax.data.documents import StdlibOptions
from selmerge_jax.data.pipeline import PipelineConfig, lm_dataset, lm_iterator, state_from_json, state_to_json
from selmerge_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
RNG = np.random.default_rng(0)
# Documents of very different lengths (one spans many windows), each tagged so a batch tells whose text it is.
DOCS = [f"<doc{i:02d}>" + "".join(RNG.choice(list("abcdefgh \n"), int(n)))
        for i, n in enumerate(RNG.integers(20, 3000, size=24))]


def _cfg(**kw):
    base = dict(seq_len=64, batch_size=4, seed=3, shuffle_window=16, shard_index=0, shard_count=1)
    return PipelineConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _stream(batches):
    """The token stream behind a sequence of batches: each window is its first input plus its targets."""
    rows = [(np.concatenate([i[:1], t]), m) for b in batches
            for i, t, m in zip(b["inputs"], b["targets"], b["loss_mask"].astype(bool), strict=True)]
    return np.concatenate([w[:1 + int(m.sum())] for w, m in rows])


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_batches_shapes_and_next_token_targets():
    batch = next(lm_iterator(DOCS, TOK, _cfg()))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "inputs": ((4, 64), "int32"), "targets": ((4, 64), "int32"), "loss_mask": ((4, 64), "float32"),
        "segment_ids": ((4, 64), "int32"), "positions": ((4, 64), "int32")}
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["loss_mask"].min() == 1.0  # an endless stream has no padding


def test_one_ordered_pass_reproduces_the_corpus():
    cfg = _cfg(shuffle=False, num_epochs=1, drop_remainder=False, batch_size=3)
    batches = list(lm_iterator(DOCS, TOK, cfg))
    stream = np.concatenate([TOK.encode(d, add_bos=True, add_eos=True) for d in DOCS])
    np.testing.assert_array_equal(_stream(batches), stream)  # nothing lost, duplicated or reordered
    inputs = np.concatenate([b["inputs"] for b in batches])
    mask = np.concatenate([b["loss_mask"] for b in batches]).astype(bool)
    assert len(inputs) == -(-len(stream) // 65)
    assert mask[-1].sum() == (len(stream) - 1) % 65  # the tail window is padded, its padding masked
    assert (inputs[-1][1:][~mask[-1][:-1]] == TOK.pad_id).all()
    assert batches[0]["segment_ids"][0, 0] == 1 and (np.diff(batches[0]["segment_ids"][0]) >= 0).all()


@pytest.mark.parametrize("consumed", [1, 3, 9, 40])  # inside the first shuffle window, and several epochs on
@pytest.mark.parametrize("passkey_ratio", [0.0, 0.3])
def test_resume_is_exact_through_json(consumed, passkey_ratio):
    cfg = _cfg(passkey_ratio=passkey_ratio, seq_len=256)
    it = lm_iterator(DOCS, TOK, cfg)
    _take(it, consumed)
    saved = state_to_json(it)
    json.loads(saved)  # plain JSON: fits beside any checkpoint
    expected = _take(it, 6)
    resumed = state_from_json(lm_iterator(DOCS, TOK, cfg), saved)
    assert _same(_take(resumed, 6), expected)


def test_seed_controls_order():
    a, b = _take(lm_iterator(DOCS, TOK, _cfg()), 3), _take(lm_iterator(DOCS, TOK, _cfg()), 3)
    assert _same(a, b)
    assert not _same(a, _take(lm_iterator(DOCS, TOK, _cfg(seed=4)), 3))
    ordered = next(lm_iterator(DOCS, TOK, _cfg(shuffle=False)))
    assert TOK.decode(ordered["inputs"][0]).startswith("<doc00>")


def _doc_tags(batches):
    return set(re.findall(r"<doc(\d\d)>", TOK.decode(_stream(batches))))


def test_processes_read_disjoint_documents():
    shards = [list(lm_iterator(DOCS, TOK, _cfg(shard_index=i, shard_count=3, num_epochs=1, shuffle=False,
                                               drop_remainder=False))) for i in range(3)]
    tags = [_doc_tags(s) for s in shards]
    assert all(tags) and not (tags[0] & tags[1] or tags[0] & tags[2] or tags[1] & tags[2])
    assert set.union(*tags) == {f"{i:02d}" for i in range(len(DOCS))}
    assert _cfg(shard_index=None, shard_count=None).shard() == (0, 1)  # jax.process_index / count


def test_passkey_mixing_ratio_and_answer_loss():
    it = lm_iterator(DOCS, TOK, _cfg(seq_len=512, batch_size=8, passkey_ratio=0.25, passkey_loss="answer"))
    rows = [(row, mask) for b in _take(it, 25) for row, mask in zip(b["inputs"], b["loss_mask"], strict=True)]
    passkey = [(r, m) for r, m in rows if "What is the pass key?" in TOK.decode(r)]
    assert 0.15 < len(passkey) / len(rows) < 0.35
    for row, mask in passkey:
        assert 1 <= mask.sum() <= 6  # only the digits of the key are scored
        assert TOK.decode(row).startswith("There is an important info hidden")


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="seq_len"):
        _cfg(seq_len=0)
    with pytest.raises(ValueError, match="give both or neither"):
        PipelineConfig(seq_len=8, batch_size=1, shard_index=0)
    with pytest.raises(ValueError, match="shard_index=3"):
        _cfg(shard_index=3, shard_count=2)
    with pytest.raises(ValueError, match="passkey_ratio"):
        _cfg(passkey_ratio=1.0)
    with pytest.raises(ValueError, match="fewer than shard_count=4"):
        lm_dataset(DOCS[:3], TOK, _cfg(shard_index=0, shard_count=4))
    with pytest.raises(ValueError, match="length=65 is too short"):
        lm_dataset(DOCS, TOK, _cfg(passkey_ratio=0.1))
    with pytest.raises(TypeError, match="documents must be str"):
        next(lm_iterator([{"text": "x"}], TOK, _cfg()))


def test_unigram_entropy():
    assert unigram_entropy(["ab" * 500], TOK, add_bos=False, add_eos=False) == pytest.approx(np.log(2))
    assert unigram_entropy(DOCS, TOK) == pytest.approx(np.log(10), abs=0.05)  # 10 equiprobable symbols


def test_tfds_corpus_through_the_pipeline(tmp_path):
    catalog.build_stdlib_corpus(tmp_path, options=StdlibOptions(max_files=30, min_document_chars=20_000),
                                name="tiny")
    docs = catalog.text_source("stdlib_corpus/tiny", "train", tmp_path)
    it = lm_iterator(docs, TOK, _cfg(seq_len=256))
    first = _take(it, 2)
    saved = state_to_json(it)
    assert _same(_take(state_from_json(lm_iterator(docs, TOK, _cfg(seq_len=256)), saved), 2), _take(it, 2))
    assert "# ===== file: " in "".join(TOK.decode(r) for b in first for r in b["inputs"])


def test_hf_tokenizer_through_the_pipeline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from selmerge_jax.data.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    batch = next(lm_iterator(DOCS, hf, _cfg(shuffle=False)))
    assert batch["inputs"][0, 0] == hf.bos_id and batch["inputs"].max() < hf.vocab_size


# ---- numpy loader (no grain, no tfds) ----------------------------------------------------------------------

def test_token_windows_resume_shapes_and_epochs():
    tokens = tokenize_documents(DOCS, TOK)
    assert tokens.dtype == np.uint16 and len(tokens) == sum(len(d.encode()) + 2 for d in DOCS)
    make = lambda: TokenWindows(tokens, seq_len=64, batch_size=4, bos_id=TOK.bos_id, seed=1)
    it = make()
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 5 * len(it))  # crosses epochs: each epoch is reshuffled
    resumed = make()
    resumed.set_state(state)
    assert _same(_take(resumed, 5 * len(it)), expected)
    batch = expected[0]
    assert batch["inputs"].shape == (4, 64) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    with pytest.raises(ValueError, match="state"):
        resumed.set_state({"step": -1})


def test_token_windows_epoch_sharding_and_segments():
    tokens = np.arange(10 * 9, dtype=np.int32) % 50 + 100
    tokens[[0, 20, 21, 50]] = 7  # bos at window starts, inside, and twice in a row
    shards = [list(TokenWindows(tokens, seq_len=8, batch_size=1, bos_id=7, seed=0, num_epochs=1,
                                shard_index=i, shard_count=2)) for i in range(2)]
    starts = [{int(b["inputs"][0, 1]) for b in s} for s in shards]  # second token identifies the window
    assert len(shards[0]) == len(shards[1]) == 5 and not starts[0] & starts[1]
    first = TokenWindows(tokens, seq_len=8, batch_size=1, bos_id=7, shuffle=False)
    w0, w2 = next(first), (next(first), next(first))[1]
    np.testing.assert_array_equal(w0["segment_ids"][0], np.ones(8))
    np.testing.assert_array_equal(w2["segment_ids"][0], [1, 1, 2, 3, 3, 3, 3, 3])  # window starts at token 18
    np.testing.assert_array_equal(w2["positions"][0], [0, 1, 0, 0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="not one batch"):
        TokenWindows(tokens[:20], seq_len=8, batch_size=4, bos_id=7)
