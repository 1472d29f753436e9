"""Synthetic long-context tasks as random-access datasets: passkey retrieval and key-value recall.

Every example is built from token pieces encoded separately and concatenated, so the length is exact for any
tokenizer (bytes or BPE) and the answer's token span is known without re-tokenizing: ``tokens[answer_start:
answer_end]`` is the answer, everything before it is the prompt. Example ``i`` of a source depends only on
``(seed, i)``, so sources are deterministic, shardable and resumable like any other grain source.

The passkey prompt is the one of Landmark Attention (Mohtashami & Jaggi, 2023), used by most long-context
papers, the select-and-merge one included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from selmerge_jax.validation import check_int, check_positive_int, check_probability

__all__ = ["PASSKEY_TASK", "PASSKEY_FILLER", "PASSKEY_QUESTION", "passkey_example", "kv_recall_example",
           "PasskeyConfig", "KVRecallConfig", "PasskeySource", "KVRecallSource", "passkey_grid"]

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. "
                "Find it and memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
KV_TASK = "Extract the value corresponding to the specified key in the JSON object below.\n{"


def _enc(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def _too_short(arg: str, length: int, need: int):
    raise ValueError(f"{arg}={length} is too short for this task with this tokenizer: need at least {need} "
                     "tokens")


def _check_depth(depth: float, name: str = "depth"):
    # 0 = right after the instruction, 1 = right before the question
    check_probability(name, depth)


def _filler(tokenizer, count: int) -> tuple[np.ndarray, int]:
    """``count`` tokens of repeated filler sentences (the last one cut), and the tokens per sentence."""
    unit = _enc(tokenizer, PASSKEY_FILLER + " ")
    return np.resize(unit, count), len(unit)  # np.resize tiles, which is exactly the repetition we want


def _assemble(head, middle, answer) -> dict:
    tokens = np.concatenate([head, middle, answer]).astype(np.int32)
    start = len(head) + len(middle)
    return {"tokens": tokens, "answer_start": np.int32(start), "answer_end": np.int32(start + len(answer))}


def passkey_example(tokenizer, length: int, depth: float, passkey: int, *, add_bos: bool = True) -> dict:
    """One passkey prompt of exactly ``length`` tokens, the answer included as its last tokens.

    ``depth`` places the key line inside the filler (0 = first, 1 = last), snapped to a sentence boundary.
    """
    _check_depth(depth)
    head = np.concatenate([[tokenizer.bos_id] if add_bos else [], _enc(tokenizer, PASSKEY_TASK + "\n")])
    info = _enc(tokenizer, f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n")
    question = _enc(tokenizer, "\n" + PASSKEY_QUESTION)
    answer = _enc(tokenizer, f" {passkey}")
    n_fill = length - len(head) - len(info) - len(question) - len(answer)
    if n_fill < 0:
        _too_short("length", length, length - n_fill)
    filler, unit = _filler(tokenizer, n_fill)
    cut = min(n_fill, int(round(depth * n_fill / unit)) * unit)
    middle = np.concatenate([filler[:cut], info, filler[cut:], question])
    out = _assemble(head.astype(np.int32), middle, answer)
    out.update(passkey=np.int32(passkey), depth=np.float32(depth), key_position=np.int32(len(head) + cut))
    return out


def kv_recall_example(tokenizer, length: int, depth: float, rng: np.random.Generator, *, key_chars: int = 8,
                      add_bos: bool = True) -> dict:
    """A JSON object of random hex keys and values filling ``length`` tokens; the question asks for the value
    of the pair at relative position ``depth``. The answer is the quoted value."""
    _check_depth(depth)
    head = np.concatenate([[tokenizer.bos_id] if add_bos else [], _enc(tokenizer, KV_TASK)]).astype(np.int32)
    hexdigits = np.array(list("0123456789abcdef"))
    pairs, pair_tokens, used = [], [], len(head)
    dummy = "0" * key_chars
    question = f'}}\nKey: "{dummy}"\nThe value associated with the specified key is: '
    question_len = len(_enc(tokenizer, question))
    reserve = question_len + len(_enc(tokenizer, f'"{dummy}"')) + 8  # slack: BPE lengths vary with the key
    while True:
        key, value = ("".join(rng.choice(hexdigits, key_chars)) for _ in range(2))
        toks = _enc(tokenizer, f'"{key}": "{value}", ')
        if used + len(toks) + reserve > length:
            break
        pairs.append((key, value))
        pair_tokens.append(toks)
        used += len(toks)
    if not pairs:
        _too_short("length", length, used + reserve + 16)
    target = int(round(depth * (len(pairs) - 1)))
    key, value = pairs[target]
    question = _enc(tokenizer, f'}}\nKey: "{key}"\nThe value associated with the specified key is: ')
    answer = _enc(tokenizer, f'"{value}"')
    n_pad = length - used - len(question) - len(answer)
    if n_pad < 0:
        _too_short("length", length, length - n_pad)
    space = _enc(tokenizer, " ")
    middle = np.concatenate(pair_tokens + [np.resize(space, n_pad), question])  # spaces: valid JSON padding
    out = _assemble(head, middle, answer)
    out.update(num_pairs=np.int32(len(pairs)), depth=np.float32(depth),
               key_position=np.int32(len(head) + sum(len(t) for t in pair_tokens[:target])))
    return out


def _check_task_config(owner: str, cfg):
    for name in ("length", "num_examples"):
        check_positive_int(f"{owner}.{name}", getattr(cfg, name))
    if cfg.depth is not None:
        _check_depth(cfg.depth, f"{owner}.depth")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyConfig:
    """length: tokens per example, answer included. depth: fixed key depth in [0, 1], or None for a uniform
    random depth per example. max_passkey: keys are drawn from [1, max_passkey) as in Landmark."""

    length: int
    depth: float | None = None
    num_examples: int = 1000
    seed: int = 0
    max_passkey: int = 50_000

    def __post_init__(self):
        _check_task_config("PasskeyConfig", self)
        check_int("PasskeyConfig.max_passkey", self.max_passkey, 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVRecallConfig:
    """length: tokens per example. depth: which pair is asked for (relative position), None = random.
    key_chars: hex characters per key and per value."""

    length: int
    depth: float | None = None
    num_examples: int = 1000
    seed: int = 0
    key_chars: int = 8

    def __post_init__(self):
        _check_task_config("KVRecallConfig", self)
        check_int("KVRecallConfig.key_chars", self.key_chars, 4, 64)


class _TaskSource(Sequence):
    """Random access over ``num_examples`` examples; example i is a pure function of (seed, i)."""

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer

    def __len__(self) -> int:
        return self.config.num_examples

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index={index} out of range for {len(self)} examples")
        index %= len(self)
        rng = np.random.default_rng([self.config.seed, index])
        depth = self.config.depth if self.config.depth is not None else float(rng.uniform())
        return self._make(rng, depth)


class PasskeySource(_TaskSource):
    def _make(self, rng, depth):
        passkey = int(rng.integers(1, self.config.max_passkey))
        return passkey_example(self.tokenizer, self.config.length, depth, passkey)


class KVRecallSource(_TaskSource):
    def _make(self, rng, depth):
        cfg = self.config
        return kv_recall_example(self.tokenizer, cfg.length, depth, rng, key_chars=cfg.key_chars)


def passkey_grid(tokenizer, lengths: Sequence[int], depths: Sequence[float], per_cell: int = 1,
                 seed: int = 0) -> list[dict]:
    """Examples over a (length x depth) grid for the retrieval heat map; each dict also has ``length``."""
    out = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            src = PasskeySource(PasskeyConfig(length=length, depth=depth, num_examples=per_cell,
                                              seed=seed * 1_000_003 + li * 1009 + di), tokenizer)
            out += [dict(ex, length=np.int32(length)) for ex in src]
    return out
