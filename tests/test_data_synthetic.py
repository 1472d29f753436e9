"""Passkey retrieval and key-value recall: exact lengths, answer spans, depth placement, determinism."""

import re

import numpy as np
import pytest

from selmerge_jax.data.synthetic import (
    PASSKEY_FILLER,
    PASSKEY_QUESTION,
    PASSKEY_TASK,
    KVRecallConfig,
    KVRecallSource,
    PasskeyConfig,
    PasskeySource,
    kv_recall_example,
    passkey_example,
    passkey_grid,
)
from selmerge_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("length", [400, 401, 1000, 4097])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_exact_length_and_answer_span(length, depth):
    ex = passkey_example(TOK, length, depth, 31337)
    tokens = ex["tokens"]
    assert tokens.shape == (length,) and tokens.dtype == np.int32
    assert ex["answer_end"] == length
    assert TOK.decode(tokens[ex["answer_start"]:ex["answer_end"]]) == " 31337"
    prompt = TOK.decode(tokens[:ex["answer_start"]])
    assert tokens[0] == TOK.bos_id
    assert prompt.startswith(PASSKEY_TASK + "\n" + PASSKEY_FILLER) or depth == 0.0
    assert prompt.endswith("\n" + PASSKEY_QUESTION)
    assert prompt.count("The pass key is 31337. Remember it. 31337 is the pass key.") == 1
    key_at = TOK.decode(tokens[ex["key_position"]:ex["key_position"] + 30])
    assert key_at.startswith("\nThe pass key is 31337")


def test_passkey_depth_orders_key_position():
    positions = [int(passkey_example(TOK, 3000, d, 7)["key_position"]) for d in np.linspace(0, 1, 6)]
    assert positions == sorted(positions) and positions[0] < 200 and positions[-1] > 2700
    shallow = TOK.decode(passkey_example(TOK, 3000, 0.0, 7)["tokens"])
    assert shallow.startswith(PASSKEY_TASK + "\n\nThe pass key is 7.")  # key first, filler after


def test_passkey_errors():
    with pytest.raises(ValueError, match="length=100 is too short"):
        passkey_example(TOK, 100, 0.5, 1)
    with pytest.raises(ValueError, match="depth"):
        passkey_example(TOK, 1000, 1.5, 1)
    with pytest.raises(ValueError, match=r"PasskeyConfig\.length"):
        PasskeyConfig(length=0)
    with pytest.raises(ValueError, match=r"PasskeyConfig\.depth"):
        PasskeyConfig(length=500, depth=-0.1)
    with pytest.raises(ValueError, match=r"KVRecallConfig\.key_chars"):
        KVRecallConfig(length=500, key_chars=2)


def test_kv_recall_answer_matches_the_asked_key():
    for depth in (0.0, 0.5, 1.0):
        ex = kv_recall_example(TOK, 2048, depth, np.random.default_rng(3))
        assert ex["tokens"].shape == (2048,)
        text = TOK.decode(ex["tokens"][:ex["answer_start"]])
        asked = re.search(r'Key: "([0-9a-f]{8})"', text).group(1)
        answer = TOK.decode(ex["tokens"][ex["answer_start"]:ex["answer_end"]])
        assert f'"{asked}": {answer}' in text
        pairs = re.findall(r'"([0-9a-f]{8})": "([0-9a-f]{8})"', text)
        assert len(pairs) == ex["num_pairs"] > 20
        target = int(round(depth * (len(pairs) - 1)))
        assert pairs[target][0] == asked
        assert TOK.decode(ex["tokens"][ex["key_position"]:]).startswith(f'"{asked}"')


def test_sources_are_deterministic_random_access():
    cfg = PasskeyConfig(length=600, num_examples=50, seed=4)
    a, b = PasskeySource(cfg, TOK), PasskeySource(cfg, TOK)
    assert len(a) == 50
    for i in (0, 17, 49, -1):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
    assert len({int(a[i]["passkey"]) for i in range(50)}) > 40
    depths = np.array([a[i]["depth"] for i in range(50)])
    assert depths.min() < 0.2 and depths.max() > 0.8  # random depth when none is fixed
    other = PasskeySource(PasskeyConfig(length=600, num_examples=50, seed=5), TOK)
    assert [int(other[i]["passkey"]) for i in range(5)] != [int(a[i]["passkey"]) for i in range(5)]
    with pytest.raises(IndexError):
        a[50]
    kv = KVRecallSource(KVRecallConfig(length=700, num_examples=3, depth=0.5), TOK)
    assert [ex["tokens"].shape for ex in kv[:]] == [(700,)] * 3


def test_passkey_grid_covers_lengths_and_depths():
    grid = passkey_grid(TOK, [500, 900], [0.0, 0.5, 1.0], per_cell=2, seed=1)
    assert len(grid) == 12
    assert sorted({(int(g["length"]), float(g["depth"])) for g in grid}) == [
        (500, 0.0), (500, 0.5), (500, 1.0), (900, 0.0), (900, 0.5), (900, 1.0)]
    assert all(len(g["tokens"]) == g["length"] for g in grid)


def test_passkey_exact_length_with_a_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from selmerge_jax.data.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([PASSKEY_TASK, PASSKEY_FILLER * 3, PASSKEY_QUESTION, "0123456789"] * 5,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path)
    ex = passkey_example(hf, 700, 0.5, 4242)
    assert ex["tokens"].shape == (700,)
    assert hf.decode(ex["tokens"][ex["answer_start"]:]).strip() == "4242"
    assert len(hf.decode(ex["tokens"])) > 2 * 700  # BPE packs the filler: far more characters than tokens
