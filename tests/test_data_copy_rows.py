"""Copy rows in the numpy loader (``TokenWindows(copy_ratio=...)``, ``data.copy_ratio``): the induction-head
curriculum that makes passkey retrieval learnable from scratch (issue #7 c)."""

import itertools
import json
import pathlib
import re

import numpy as np
import pytest

from selmerge_jax.data.arrays import TokenWindows
from selmerge_jax.data.config import DataConfig
from selmerge_jax.data.synthetic import PASSKEY_QUESTION
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.main.config import PretrainConfig, load_experiment

ROOT = pathlib.Path(__file__).parents[1]
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tokens():
    text = (ROOT / "selmerge_jax" / "data" / "arrays.py").read_text()
    return TOK.encode(text * 3, add_bos=True, add_eos=True).astype(np.uint16)


def _windows(tokens, **kw):
    return TokenWindows(tokens, seq_len=320, batch_size=8, bos_id=TOK.bos_id, seed=5, tokenizer=TOK, **kw)


def _period(row: np.ndarray) -> int | None:
    """The smallest p with row[i] == row[i - p] everywhere (None: not periodic)."""
    for p in range(1, len(row) // 2 + 1):
        if np.array_equal(row[p:], row[:-p]):
            return p
    return None


def _rows(batch):
    return [np.append(i[:1], t) for i, t in zip(batch["inputs"], batch["targets"], strict=True)]


def test_copy_rows_repeat_a_random_string_with_the_first_period_masked(tokens):
    it = _windows(tokens, passkey_ratio=0.3, copy_ratio=0.4, copy_period=(8, 32))
    kinds = []
    for _ in range(6):
        b = next(it)
        for row, mask in zip(_rows(b), b["loss_mask"], strict=True):
            p = _period(row)
            if PASSKEY_QUESTION in TOK.decode(row):
                kinds.append("passkey")
                assert mask.all()
            elif p is not None and p <= 32:
                kinds.append("copy")
                assert 8 <= p and (row < 256).all()  # no bos/eos/pad: they would split "documents"
                np.testing.assert_array_equal(mask, np.arange(320) >= p - 1)  # targets 0..p-2 are the noise
            else:
                kinds.append("corpus")
                assert mask.all()
    share = {k: kinds.count(k) / len(kinds) for k in ("passkey", "copy", "corpus")}
    assert 0.15 < share["passkey"] < 0.5 and 0.2 < share["copy"] < 0.6 and share["corpus"] > 0.1, share


def test_copy_ratio_zero_keeps_every_row(tokens):
    # copy rows draw from their own stream: the passkey/corpus rows of a run without them are bit-identical.
    with_copy, without = _windows(tokens, passkey_ratio=0.3, copy_ratio=0.3), _windows(tokens,
                                                                                       passkey_ratio=0.3)
    for _ in range(3):
        a, b = next(with_copy), next(without)
        keep = a["loss_mask"].all(axis=1)
        np.testing.assert_array_equal(a["inputs"][keep], b["inputs"][keep])


@pytest.mark.parametrize("kw", [{"copy_ratio": 0.5}, {"passkey_ratio": 0.3},
                                {"passkey_ratio": 0.3, "copy_ratio": 0.3, "passkey_answer_weight": 4.0}])
def test_mixed_rows_resume_exactly(tokens, kw):
    """Copy rows, passkey rows and both (weighted answers): the state after a JSON round trip replays them."""
    it = _windows(tokens, **kw)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    again = _windows(tokens, **kw)
    again.set_state(state)
    for a, b in zip(expected, (next(again) for _ in range(4)), strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, message", [
    ({"copy_ratio": 1.0}, r"copy_ratio=1\.0: must be a number in \[0, 1\)"),
    ({"copy_ratio": True}, "copy_ratio=True: must be a number"),
    ({"copy_ratio": 0.6, "passkey_ratio": 0.5}, "must be < 1"),
    ({"copy_ratio": 0.2, "copy_period": (1, 8)}, "copy_period"),
    ({"copy_ratio": 0.2, "copy_period": (16, 8)}, "copy_period"),
    ({"copy_ratio": 0.2, "copy_period": (8, 200)}, r"2 \* high <= seq_len \+ 1 = 321"),
    ({"copy_ratio": 0.2, "copy_period": (8.0, 16)}, "copy_period"),
])
def test_copy_rows_bad_arguments(tokens, kw, message):
    with pytest.raises(ValueError, match=message):
        _windows(tokens, **kw)


def test_data_config_copy_ratio_checks():
    with pytest.raises(ValueError, match=r"copy_ratio=0.6 must be in \[0, 1 - passkey_ratio = 0.5\)"):
        DataConfig(train_npy="a.npy", validation_npy="b.npy", passkey_ratio=0.5, copy_ratio=0.6)
    with pytest.raises(ValueError, match="needs train_npy"):
        DataConfig(copy_ratio=0.2)


def test_runner_npy_branch_passes_copy_rows(tmp_path, tokens):
    from selmerge_jax.main.pretrain import make_data

    np.save(tmp_path / "t.npy", tokens)
    cfg = load_experiment(PretrainConfig, None, [
        "model={preset: tiny}", f"data.train_npy={tmp_path / 't.npy'}",
        f"data.validation_npy={tmp_path / 't.npy'}",
        "data.copy_ratio=0.5", "data.copy_period=[4, 6]", "train.seq_len=64", "train.batch_size=8"])
    train_it, eval_fn = make_data(cfg, TOK)
    train_periods = [_period(r) for _ in range(3) for r in _rows(next(train_it))]
    assert any(p is not None and 4 <= p <= 6 for p in train_periods)
    assert all(b["loss_mask"].all() for b in eval_fn())  # validation stays corpus only


def test_passkey_answer_weight_scales_only_the_answer_targets(tokens):
    b = next(_windows(tokens, passkey_ratio=0.6, passkey_answer_weight=5.0))
    seen = 0
    for row, mask in zip(_rows(b), b["loss_mask"], strict=True):
        text = TOK.decode(row)
        if PASSKEY_QUESTION not in text:
            assert mask.all() and (mask == 1).all()
            continue
        seen += 1
        key = text.split("The pass key is ")[1].split(".")[0]
        answer = np.flatnonzero(mask == 5.0)
        assert len(answer) == len(key) + 1 and answer[-1] == 319  # " " + digits, the window's last targets
        assert TOK.decode(row[answer + 1]) == f" {key}"
        assert (np.delete(mask, answer) == 1).all()
    assert seen


@pytest.mark.parametrize("weight", [0.5, 2000.0, True, "5"])
def test_passkey_answer_weight_bad_values(tokens, weight):
    message = rf"passkey_answer_weight={re.escape(repr(weight))}: must be a number in \[1, 1000\]"
    with pytest.raises(ValueError, match=message):
        _windows(tokens, passkey_ratio=0.3, passkey_answer_weight=weight)


def test_data_config_answer_weight_needs_npy():
    with pytest.raises(ValueError, match=r"passkey_answer_weight=5\.0 needs train_npy"):
        DataConfig(passkey_ratio=0.3, passkey_answer_weight=5.0)


def test_passkey_min_length_packs_prompts_of_random_lengths(tokens):
    it = TokenWindows(tokens, seq_len=1023, batch_size=4, bos_id=TOK.bos_id, seed=2, tokenizer=TOK,
                      passkey_ratio=0.9, passkey_min_length=300, passkey_answer_weight=4.0)
    lengths, ends = [], set()
    for _ in range(3):
        b = next(it)
        for row, mask, seg in zip(_rows(b), b["loss_mask"], b["segment_ids"], strict=True):
            if PASSKEY_QUESTION not in TOK.decode(row):
                continue
            starts = np.flatnonzero(row == TOK.bos_id)
            assert starts[0] == 0 and len(starts) == seg.max()  # one segment (positions restart) per prompt
            bounds = [*starts, len(row)]
            lengths += [int(b - a) for a, b in itertools.pairwise(bounds)]
            answers = np.flatnonzero(mask == 4.0)
            for a, b in itertools.pairwise(bounds):  # every prompt's answer ends its prompt
                text = TOK.decode(row[a:b])
                key = text.split("The pass key is ")[1].split(".")[0]
                assert text.endswith(f"{PASSKEY_QUESTION} {key}")
                assert b - 2 in answers  # the last answer token is target b - 2
                ends.add(int(b))
    assert min(lengths) >= 300 and max(lengths) <= 1024 and len(set(lengths)) > 3, lengths
    assert len(ends) > 3  # answers at many positions, not only the window's end


def test_passkey_min_length_checks(tokens):
    with pytest.raises(ValueError,
                       match=r"passkey_min_length=200: must be None or an int in \[64, "
                             r"\(seq_len \+ 1\) // 3 = 107\]"):
        _windows(tokens, passkey_ratio=0.3, passkey_min_length=200)  # fits the window, but packs one prompt
    with pytest.raises(ValueError, match="too short"):
        _windows(tokens, passkey_ratio=0.3, passkey_min_length=100)
    with pytest.raises(ValueError, match="needs train_npy"):
        DataConfig(passkey_ratio=0.3, passkey_min_length=300)
