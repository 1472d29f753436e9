"""numpy-only tools for machines without grain or tfds (the GPU box): a loader over a pre-tokenized stream
and corpus token statistics.

Same batch format as the grain pipeline (``inputs``, ``targets``, ``loss_mask``, ``segment_ids``,
``positions``), same packing (documents concatenated with bos/eos, cut into windows of seq_len + 1), but
windows are addressed directly in one flat token array: shuffling is a per-epoch permutation of window
indices, and the whole iterator state is the step number. Step s's global batch is windows
``[s*G, (s+1)*G)`` of the epoch's permutation (``G = batch_size * shard_count``) and shard i reads its
contiguous ``batch_size`` rows of it, so the global batch (rows in order) does not depend on how many shards
read it: a run resumes under another process count (``reshardable``) unless passkey or copy rows are mixed
in, whose draws are keyed by the shard.
The order differs from the grain pipeline's (no document-then-window shuffle); both are exact on resume.
With ``passkey_ratio > 0`` some rows of each batch are replaced by passkey-retrieval prompts of seq_len + 1
tokens (random key and depth, loss on every token, as the grain pipeline's default); which rows and what they
hold are a pure function of ``(seed, step, shard)``, so resume stays exact and the state is still the step.
``passkey_answer_weight`` scales the loss of a passkey row's answer tokens: the 5-6 answer tokens are the only
ones that need retrieval, and at weight 1 they are a vanishing share of the loss. ``passkey_min_length`` packs
each passkey row with prompts of random lengths in [passkey_min_length, seq_len + 1] instead of one prompt of
exactly seq_len + 1: with one full-window prompt the answer always sits at the window's last positions, and a
small model learns that absolute position (evaluated one token shorter, it lost two thirds of its retrieval).
With ``copy_ratio > 0`` other rows become copy rows: a random string of corpus tokens (period drawn from
``copy_period``) repeated to the window's length, loss on every repeat. Only an induction head predicts them,
and it forms on these within a few hundred steps, where passkey prompts alone (5 random answer tokens per
window) left small models at chance (see experiments/results/archive/h100_eval_README.md).

    docs = split_documents(stdlib_documents(), 0.1)          # pure Python: no tfds needed
    tokens = tokenize_documents([d["text"] for d in docs["train"]], tokenizer)
    batches = TokenWindows(tokens, seq_len=4096, batch_size=8, bos_id=tokenizer.bos_id, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from selmerge_jax.data.synthetic import passkey_example
from selmerge_jax.validation import check_fraction, check_int, check_number, check_positive_int, fail

__all__ = ["TokenWindows", "tokenize_documents", "unigram_entropy"]

_MAX_PASSKEY = 50_000  # keys in [1, 50000), as synthetic.PasskeyConfig and the evaluation grid draw them
_PASSKEY_STREAM = 0x9A55  # separates the passkey draws from the window permutation's rng([seed, epoch])
_PACK_STREAM = 0x9ACC  # lengths, keys and depths of packed passkey prompts (passkey_min_length)
_COPY_STREAM = 0xC0B7  # the copy rows' own draws, so copy_ratio=0 leaves every other row bit-identical


def tokenize_documents(documents: Sequence[str], tokenizer, *, add_bos: bool = True,
                       add_eos: bool = True) -> np.ndarray:
    """One flat stream, uint16 when the vocabulary fits (halves memory and .npy size), else int32."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    parts = [tokenizer.encode(d, add_bos=add_bos, add_eos=add_eos).astype(dtype) for d in documents]
    if not parts:
        raise ValueError("documents is empty")
    return np.concatenate(parts)


def _segments(window: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1, 2, ... per document inside the window) and positions restarting at every bos."""
    is_bos = window == bos_id
    seg = 1 + np.cumsum(is_bos) - int(is_bos[0])
    idx = np.arange(len(window))
    start = np.maximum.accumulate(np.where(is_bos, idx, 0))
    return seg.astype(np.int32), (idx - start).astype(np.int32)


class TokenWindows:
    """Iterator of batches of windows over ``tokens``; ``get_state()``/``set_state()`` resume exactly.

    Only full windows are used (the tail shorter than seq_len + 1 is dropped) and only full batches are
    emitted, so every batch has the static shape ``[batch_size, seq_len]``.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, bos_id: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, passkey_ratio: float = 0.0, tokenizer=None, copy_ratio: float = 0.0,
                 copy_period: tuple[int, int] = (8, 64), passkey_answer_weight: float = 1.0,
                 passkey_min_length: int | None = None):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("shard_count", shard_count)):
            check_positive_int(name, value)
        check_int("shard_index", shard_index, 0, shard_count - 1)
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        self.tokens, self.seq_len, self.batch_size, self.bos_id = tokens, seq_len, batch_size, bos_id
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.shard_index, self.shard_count = shard_index, shard_count
        self.num_windows = len(tokens) // (seq_len + 1)
        self.batches_per_epoch = self.num_windows // shard_count // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"tokens has {len(tokens)} tokens: not one batch of {batch_size} windows of "
                             f"{seq_len + 1} per each of {shard_count} shards")
        self.passkey_ratio, self.tokenizer = _check_passkey(passkey_ratio, tokenizer, seq_len), tokenizer
        check_number("passkey_answer_weight", passkey_answer_weight, 1, 1000)
        self.passkey_answer_weight = float(passkey_answer_weight)
        self.passkey_min_length = _check_min_length(passkey_min_length, tokenizer, seq_len)
        self.copy_ratio, self.copy_period = _check_copy(copy_ratio, copy_period, self.passkey_ratio, seq_len)
        self._copy_vocab = _copy_vocab(tokens, bos_id, tokenizer) if self.copy_ratio > 0 else None
        self.step = 0

    def __iter__(self):
        return self

    def __len__(self) -> int:
        """Batches per epoch on this shard."""
        return self.batches_per_epoch

    def _window_ids(self, epoch: int, batch: int) -> np.ndarray:
        order = np.arange(self.num_windows)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        start = (batch * self.shard_count + self.shard_index) * self.batch_size
        return order[start:start + self.batch_size]

    def __next__(self) -> dict:
        epoch, batch = divmod(self.step, self.batches_per_epoch)
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise StopIteration
        width = self.seq_len + 1
        windows = np.stack([self.tokens[w * width:(w + 1) * width] for w in self._window_ids(epoch, batch)])
        windows = windows.astype(np.int32)
        loss_mask = np.ones((len(windows), self.seq_len), np.float32)
        if self.passkey_ratio > 0 or self.copy_ratio > 0:
            windows = self._mix_passkeys(windows, epoch * self.batches_per_epoch + batch, loss_mask)
        segs, pos = zip(*(_segments(w, self.bos_id) for w in windows), strict=True)
        segs, pos = np.stack(segs), np.stack(pos)
        self.step += 1
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "loss_mask": loss_mask,
                "segment_ids": segs[:, :-1], "positions": pos[:, :-1]}

    def _mix_passkeys(self, windows: np.ndarray, step: int, loss_mask: np.ndarray) -> np.ndarray:
        # Keyed by (seed, step, shard) only: the same batch comes back after a resume, on any host.
        rng = np.random.default_rng([self.seed, step, self.shard_index, _PASSKEY_STREAM])
        draw = rng.random(len(windows))
        keys, depths = rng.integers(1, _MAX_PASSKEY, len(windows)), rng.random(len(windows))
        pack_rng = np.random.default_rng([self.seed, step, self.shard_index, _PACK_STREAM])
        for row in np.flatnonzero(draw < self.passkey_ratio):
            if self.passkey_min_length is None:
                ex = passkey_example(self.tokenizer, self.seq_len + 1, float(depths[row]), int(keys[row]))
                self._put_prompt(windows, loss_mask, row, 0, ex)
            else:
                self._pack_prompts(windows, loss_mask, row, pack_rng)
        copy_rows = np.flatnonzero((draw >= self.passkey_ratio)
                                   & (draw < self.passkey_ratio + self.copy_ratio))
        if len(copy_rows):
            copy_rng = np.random.default_rng([self.seed, step, self.shard_index, _COPY_STREAM])
            for row in copy_rows:
                period = int(copy_rng.integers(self.copy_period[0], self.copy_period[1] + 1))
                windows[row] = np.resize(copy_rng.choice(self._copy_vocab, period), self.seq_len + 1)
                # the first period is noise: only its repeats are predictable
                loss_mask[row, :period - 1] = 0.0
        return windows

    def _put_prompt(self, windows, loss_mask, row: int, at: int, ex: dict):
        n = len(ex["tokens"])
        windows[row, at:at + n] = ex["tokens"]
        loss_mask[row, at:at + n - 1] = 1.0
        # target j predicts token j + 1: the answer's tokens [start, end) are targets [start - 1, end - 1)
        start, end = at + int(ex["answer_start"]), at + int(ex["answer_end"])
        loss_mask[row, start - 1:end - 1] = self.passkey_answer_weight

    def _pack_prompts(self, windows, loss_mask, row: int, rng: np.random.Generator):
        at, width, low = 0, self.seq_len + 1, self.passkey_min_length
        while at < width:
            left = width - at
            n = int(rng.integers(low, left + 1)) if left >= low else left
            if left - n < low:  # a remainder too short for a prompt goes to this one
                n = left
            ex = passkey_example(self.tokenizer, n, float(rng.random()), int(rng.integers(1, _MAX_PASSKEY)))
            self._put_prompt(windows, loss_mask, row, at, ex)
            at += n

    @property
    def reshardable(self) -> bool:
        """Whether a position saved under one shard count resumes exactly under another: true for corpus
        windows (the state is the global step, the global batch does not depend on the sharding), false with
        passkey or copy rows (their draws are keyed by ``(seed, step, shard_index)``)."""
        return self.passkey_ratio == 0 and self.copy_ratio == 0

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        step = state.get("step") if isinstance(state, dict) else None
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"state must be {{'step': int >= 0}}, got {state!r}")
        self.step = step


def _check_passkey(ratio, tokenizer, seq_len: int) -> float:
    check_fraction("passkey_ratio", ratio)
    if ratio > 0:
        if tokenizer is None:
            raise ValueError(f"passkey_ratio={ratio} needs the tokenizer (to write the "
                             "passkey prompts), got None")
        # fails now, naming the length, if too short
        passkey_example(tokenizer, seq_len + 1, 0.5, _MAX_PASSKEY - 1)
    return float(ratio)


def _check_min_length(length, tokenizer, seq_len: int) -> int | None:
    if length is None:
        return None
    # Above a third of the window the packing is a no-op: a first prompt of [min, seq_len + 1] tokens almost
    # never leaves room for a second, so every answer sits at the window's end (H100 pk6: the model learned
    # that absolute position and failed one token off it). At a third, half of the windows hold several
    # prompts.
    most = (seq_len + 1) // 3
    if isinstance(length, bool) or not isinstance(length, int) or not 64 <= length <= most:
        fail("passkey_min_length", length, f"None or an int in [64, (seq_len + 1) // 3 = {most}] (longer "
             "minimums leave no room to pack a second prompt)")
    if tokenizer is None:
        raise ValueError(f"passkey_min_length={length} needs the tokenizer (to write the "
                         "passkey prompts), got None")
    passkey_example(tokenizer, length, 0.5, _MAX_PASSKEY - 1)  # fails now, naming the length, if too short
    return length


def _check_copy(ratio, period, passkey_ratio: float, seq_len: int) -> tuple[float, tuple[int, int]]:
    check_fraction("copy_ratio", ratio)
    if ratio + passkey_ratio >= 1.0:
        raise ValueError(f"copy_ratio={ratio} + passkey_ratio={passkey_ratio} must be < 1 "
                         "(some rows stay corpus)")
    if ratio == 0:
        return 0.0, tuple(period)  # unused: a short seq_len without copy rows must not trip the period check
    ok = (isinstance(period, (tuple, list)) and len(period) == 2
          and all(isinstance(p, int) and not isinstance(p, bool) for p in period))
    if not ok or not 2 <= period[0] <= period[1] or 2 * period[1] > seq_len + 1:
        raise ValueError("copy_period must be (low, high) ints with 2 <= low <= high and "
                         "2 * high <= seq_len + 1 "
                         f"= {seq_len + 1} (each row repeats its string at least twice), got {period!r}")
    return float(ratio), (int(period[0]), int(period[1]))


def _copy_vocab(tokens: np.ndarray, bos_id: int, tokenizer) -> np.ndarray:
    """The distinct ids of the stream minus the specials: copy strings are drawn uniformly from these."""
    specials = {bos_id} | ({tokenizer.eos_id, tokenizer.pad_id} if tokenizer is not None else set())
    ids = np.unique(np.asarray(tokens[: 1 << 24]))  # a prefix is plenty to find the vocabulary in use
    ids = ids[~np.isin(ids, list(specials))].astype(np.int32)
    if len(ids) < 2:
        raise ValueError(f"copy_ratio needs at least 2 non-special token ids in tokens, found {len(ids)}")
    return ids


def unigram_entropy(documents: Sequence, tokenizer, *, add_bos: bool = True, add_eos: bool = True) -> float:
    """Entropy in nats of the corpus's token unigram distribution: the loss of a model that ignores context
    (the bar the tiny demo must get well below)."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for doc in documents:
        text = doc.decode("utf-8") if isinstance(doc, bytes) else doc
        counts += np.bincount(tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos),
                              minlength=tokenizer.vocab_size)
    if counts.sum() == 0:
        raise ValueError("documents hold no tokens")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
