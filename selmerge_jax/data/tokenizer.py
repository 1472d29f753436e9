"""Tokenizers with one small interface: a byte-level default and a wrapper around a local ``tokenizer.json``.

Both expose ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``encode(text) -> int32 array`` and
``decode(ids) -> str``. ``load_tokenizer(None)`` gives the byte tokenizer, so the embedded corpus, the tiny
demo and the tests need no file and no network; ``load_tokenizer("path/to/tokenizer.json")`` (or a directory
holding one, as Hugging Face checkpoints ship it) gives :class:`HFTokenizer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from tokenizers import Tokenizer as _RustTokenizer

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, generation and evaluation rely on."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str: ...


def _as_id_array(ids, name: str = "ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a 1-D sequence of ints, got dtype={arr.dtype} shape={arr.shape}")
    return arr.astype(np.int64, copy=False)


def _wrap(ids: np.ndarray, bos: int, eos: int, add_bos: bool, add_eos: bool) -> np.ndarray:
    parts = [np.array([bos], np.int32)] if add_bos else []
    parts.append(ids.astype(np.int32, copy=False))
    if add_eos:
        parts.append(np.array([eos], np.int32))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``pad=256``, ``bos=257``, ``eos=258``: vocab 259, lossless on any text.

    Pad comes first among the specials so a model whose vocab is rounded up (e.g. to 384 or 512 for matmul
    tiling) still finds every id below 259; decoding drops specials and replaces invalid UTF-8 sequences
    (a model can emit a lone continuation byte) instead of raising.
    """

    _PAD, _BOS, _EOS = 256, 257, 258

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def bos_id(self) -> int:
        return self._BOS

    @property
    def eos_id(self) -> int:
        return self._EOS

    @property
    def pad_id(self) -> int:
        return self._PAD

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return _wrap(ids, self._BOS, self._EOS, add_bos, add_eos)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
        arr = _as_id_array(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        if not skip_special and (arr >= 256).any():
            names = {self._PAD: "<pad>", self._BOS: "<bos>", self._EOS: "<eos>"}
            pieces, start = [], 0
            for pos in np.flatnonzero(arr >= 256):
                text = bytes(arr[start:pos].astype(np.uint8)).decode("utf-8", "replace")
                pieces += [text, names[int(arr[pos])]]
                start = pos + 1
            pieces.append(bytes(arr[start:].astype(np.uint8)).decode("utf-8", "replace"))
            return "".join(pieces)
        return bytes(arr[arr < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, pad=256, bos=257, eos=258)"


# Special-token spellings of common model families, tried in order when the caller names none.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<unk>", "<|endoftext|>")


def _config_token(directory: str, field: str) -> str | None:
    """Reads e.g. ``bos_token`` from the ``tokenizer_config.json`` that HF checkpoints ship beside it."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        value = json.load(f).get(field)
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (no network, no
    transformers).

    Special tokens: explicit arguments win, then ``tokenizer_config.json`` beside the file, then common
    spellings (``<s>``, ``<|begin_of_text|>``, ...). A missing pad falls back to eos, which is safe because
    padded positions are masked out of the loss.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path={path!r}: no tokenizer.json there")
        self.path = path
        self._tok = _RustTokenizer.from_file(path)
        directory = os.path.dirname(path)
        self._bos = self._resolve("bos_token", bos_token, _config_token(directory, "bos_token"), _BOS_NAMES)
        self._eos = self._resolve("eos_token", eos_token, _config_token(directory, "eos_token"), _EOS_NAMES)
        pad = self._resolve("pad_token", pad_token, _config_token(directory, "pad_token"), _PAD_NAMES,
                            required=False)
        self._pad = self._eos if pad is None else pad

    def _resolve(self, arg: str, explicit: str | None, configured: str | None, names: Iterable[str],
                 required: bool = True) -> int | None:
        if explicit is not None:
            token_id = self._tok.token_to_id(explicit)
            if token_id is None:
                raise ValueError(f"{arg}={explicit!r} is not in the vocabulary of {self.path}")
            return token_id
        for name in ((configured,) if configured else ()) + tuple(names):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if required:
            raise ValueError(f"{self.path} has none of the usual {arg} spellings {tuple(names)}; pass {arg}=")
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        # The tokenizer's own post-processor may add specials too; we control them explicitly instead.
        ids = np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)
        return _wrap(ids, self._bos, self._eos, add_bos, add_eos)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
        arr = _as_id_array(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return self._tok.decode(arr.tolist(), skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos}, "
                f"pad={self._pad})")


def load_tokenizer(path: str | os.PathLike | None = None, **special_tokens) -> Tokenizer:
    """``None`` or ``"byte"`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` file or its directory -> HF."""
    if path is None or (isinstance(path, str) and path in ("", "byte", "bytes")):
        if special_tokens:
            raise ValueError(f"special_tokens={special_tokens} only apply to a tokenizer.json, not the bytes")
        return ByteTokenizer()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be None, 'byte' or a path to tokenizer.json, got {type(path).__name__}")
    return HFTokenizer(path, **special_tokens)
