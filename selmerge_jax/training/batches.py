"""Batches from a flat array of token ids (e.g. a pre-tokenized ``.npy``), with a savable iterator state.

The training loop takes any iterator of batch dicts; when it also has ``get_state()``/``set_state()`` (grain's
``DatasetIterator`` does, and so does :class:`TokenWindowBatches`) that state goes into every checkpoint and a
resumed run sees exactly the batches the uninterrupted run would have. This class is the dependency-free
source for boxes without grain/TFDS (e.g. a GPU machine fed a ``.npy`` built elsewhere) and for tests.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TokenWindowBatches", "eval_windows"]


def _check_tokens(tokens, seq_len: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be a 1-D integer array, got dtype={tokens.dtype} shape={tokens.shape}")
    if tokens.size < seq_len + 2:
        raise ValueError(f"tokens has {tokens.size} ids; need more than seq_len + 1 = {seq_len + 1}")
    return tokens


class TokenWindowBatches:
    """Random ``seq_len + 1`` windows of ``tokens``: batch ``i`` depends only on ``(seed, i)``.

    Each process draws the whole global batch's offsets and keeps its own rows, so every host agrees on the data
    order without communication. ``batch_size`` is the per-process row count times ``process_count``.
    """

    def __init__(self, tokens, *, batch_size: int, seq_len: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0 <= process_index < process_count or batch_size % process_count:
            raise ValueError(f"process_index={process_index}, process_count={process_count} must satisfy "
                             f"0 <= index < count and count | batch_size={batch_size}")
        self.tokens = _check_tokens(tokens, seq_len)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        rows = batch_size // process_count
        self._rows = slice(process_index * rows, (process_index + 1) * rows)
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self._next])
        starts = rng.integers(0, self.tokens.size - self.seq_len, size=self.batch_size)[self._rows]
        self._next += 1
        window = starts[:, None] + np.arange(self.seq_len + 1)
        return {"tokens": self.tokens[window].astype(np.int32)}

    def get_state(self) -> dict:
        return {"next_batch": self._next, "seed": self.seed}

    def set_state(self, state: dict):
        if not isinstance(state, dict) or not isinstance(state.get("next_batch"), int):
            raise ValueError(f"state must be a dict with an int 'next_batch', got {state!r}")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']}, this iterator has seed={self.seed}")
        self._next = state["next_batch"]


def eval_windows(tokens, *, batch_size: int, seq_len: int, num_batches: int):
    """Deterministic validation batches: consecutive non-overlapping windows from the start of ``tokens``."""
    tokens = _check_tokens(tokens, seq_len)
    per_batch = batch_size * (seq_len + 1)
    available = tokens.size // per_batch
    if available < 1:
        raise ValueError(f"validation tokens ({tokens.size}) are fewer than one batch ({per_batch})")
    for i in range(min(num_batches, available)):
        chunk = tokens[i * per_batch:(i + 1) * per_batch]
        yield {"tokens": chunk.reshape(batch_size, seq_len + 1).astype(np.int32)}
