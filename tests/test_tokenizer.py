"""Byte tokenizer and the local tokenizer.json wrapper: round trips, specials, errors."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selmerge_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_roundtrip_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_byte_specials_are_distinct_and_in_vocab():
    tok = load_tokenizer(None)
    assert isinstance(tok, Tokenizer)
    specials = {tok.pad_id, tok.bos_id, tok.eos_id}
    assert len(specials) == 3 and min(specials) >= 256 and max(specials) < tok.vocab_size == 259
    assert tok.decode([104, 105, tok.eos_id, 33], skip_special=False) == "hi<eos>!"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # truncated UTF-8 from a model: replaced, not raised


def test_byte_rejects_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="ids must lie in"):
        tok.decode([300])
    with pytest.raises(TypeError, match="ids"):
        tok.decode([[1, 2]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["def f(x):\n    return x + 1\n", "The grass is green. The sky is blue."] * 20
    tok.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(d / "tokenizer.json"))
    return d


def test_hf_roundtrip_and_specials(hf_dir):
    tok = load_tokenizer(hf_dir)  # a directory works like a checkpoint folder
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = "The sky is green.\ndef g(y): return y"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32 and ids[0] == 1 and ids[-1] == 2
    assert len(ids) < len(text.encode()) + 2  # BPE merges actually happen
    assert tok.decode(ids) == text


def test_hf_specials_from_config_and_arguments(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "</s>"}}))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.bos_id == 2  # the config's choice beats the "<s>" spelling
    assert HFTokenizer(tmp_path, pad_token="<unk>").pad_id == 0
    with pytest.raises(ValueError, match="eos_token='<nope>'"):
        HFTokenizer(tmp_path, eos_token="<nope>")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="path"):
        load_tokenizer(3)
    with pytest.raises(ValueError, match="special_tokens"):
        load_tokenizer(None, bos_token="<s>")
