"""The grain input pipeline for language modelling: tokenize, pack to ``seq_len + 1``, shuffle, shard, batch.

Order of operations (all deterministic given the seed, all checkpointable through the iterator's state):

  documents (random access) -> this process's shard -> shuffle (reseeded every epoch) -> repeat -> tokenize
  (bos + text + eos) -> concatenate and split into windows of seq_len + 1 -> window shuffle buffer
  -> [mix with synthetic passkey windows] -> inputs/targets/loss_mask -> batch.

Windows of ``seq_len + 1`` tokens give ``seq_len`` inputs and their next-token targets. Packing crosses
document boundaries (every document starts with bos), so no token is wasted on padding except at the very end
of a finite pass. ``iterator.get_state()`` / ``set_state()`` resume exactly: the test consumes n batches,
restores the state in a fresh iterator and compares the following batches bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import grain
import jax
import numpy as np
from grain import experimental as gx

from selmerge_jax.data.synthetic import PasskeyConfig, PasskeySource
from selmerge_jax.validation import check_choice, check_fraction, check_int, check_positive_int

__all__ = ["PipelineConfig", "lm_dataset", "lm_iterator", "lm_example", "passkey_windows", "state_to_json",
           "state_from_json"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Attributes:
      seq_len: model input length T (windows hold T + 1 tokens).
      batch_size: examples per batch *on this process* (global batch = batch_size * shard_count).
      seed: shuffling seed (documents, windows and passkey examples).
      shuffle: shuffle documents per epoch and windows through a buffer; False keeps corpus order (eval).
      shuffle_window: windows in the shuffle buffer; long documents yield runs of windows, this mixes them.
      num_epochs: passes over the documents; None repeats forever (training). Shards hold different numbers
        of tokens, so with several processes a finite pass ends at different steps on each: evaluate a fixed
        number of batches there.
      shard_index / shard_count: this process's document shard; None = jax.process_index() / process_count().
      add_bos / add_eos: mark document boundaries inside packed windows.
      drop_remainder: drop a last partial batch (static shapes under jit); only matters for finite passes.
      passkey_ratio: fraction of windows replaced by passkey-retrieval examples of the same length.
      passkey_loss: ``"all"`` tokens of a passkey window count in the loss, or only the ``"answer"``.
      prefetch_documents: documents tokenized ahead by a background thread; 0 = synchronous. Kept small on
        purpose: grain's default read-ahead (hundreds of elements) of megabyte-long documents holds gigabytes.
    """

    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 64
    num_epochs: int | None = None
    shard_index: int | None = None
    shard_count: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    drop_remainder: bool = True
    passkey_ratio: float = 0.0
    passkey_loss: str = "all"
    prefetch_documents: int = 2

    def __post_init__(self):
        check_int("PipelineConfig.prefetch_documents", self.prefetch_documents, 0)
        for name in ("seq_len", "batch_size", "shuffle_window"):
            check_positive_int(f"PipelineConfig.{name}", getattr(self, name))
        check_positive_int("PipelineConfig.num_epochs", self.num_epochs, allow_none=True)
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError(f"PipelineConfig.shard_index={self.shard_index!r} and shard_count="
                             f"{self.shard_count!r}: give both or neither")
        if self.shard_count is not None:
            check_positive_int("PipelineConfig.shard_count", self.shard_count)
            check_int("PipelineConfig.shard_index", self.shard_index, 0, self.shard_count - 1)
        check_fraction("PipelineConfig.passkey_ratio", self.passkey_ratio)
        check_choice("PipelineConfig.passkey_loss", self.passkey_loss, ("all", "answer"))

    def shard(self) -> tuple[int, int]:
        if self.shard_count is not None:
            return self.shard_index, self.shard_count
        return jax.process_index(), jax.process_count()


class _Tokenize:
    """A class rather than a closure so the pipeline pickles into grain worker processes."""

    def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
        self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

    def __call__(self, text) -> dict:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise TypeError(f"documents must be str or bytes, got {type(text).__name__}; wrap TFDS records "
                            "with catalog.TextView(source, key)")
        return {"tokens": self.tokenizer.encode(text, add_bos=self.add_bos, add_eos=self.add_eos)}


def lm_example(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, pad_id: int,
               loss_mask: np.ndarray | None = None) -> dict:
    """A window of T + 1 tokens -> model inputs/targets of length T. Segment id 0 marks padding."""
    valid = segment_ids > 0
    mask = valid[1:] if loss_mask is None else (valid[1:] & loss_mask[1:])
    return {
        "inputs": np.where(valid[:-1], tokens[:-1], pad_id).astype(np.int32),
        "targets": np.where(valid[1:], tokens[1:], pad_id).astype(np.int32),
        "loss_mask": mask.astype(np.float32),
        "segment_ids": segment_ids[:-1].astype(np.int32),
        "positions": positions[:-1].astype(np.int32),
    }


class _PackedToExample:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, packed: dict) -> dict:
        return lm_example(packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"],
                          self.pad_id)


class _PasskeyToExample:
    def __init__(self, pad_id: int, answer_only: bool):
        self.pad_id, self.answer_only = pad_id, answer_only

    def __call__(self, ex: dict) -> dict:
        n = len(ex["tokens"])
        mask = None
        if self.answer_only:
            mask = np.zeros(n, bool)
            mask[ex["answer_start"]:ex["answer_end"]] = True
        return lm_example(ex["tokens"], np.ones(n, np.int32), np.arange(n, dtype=np.int32), self.pad_id, mask)


def passkey_windows(tokenizer, cfg: PipelineConfig) -> grain.IterDataset:
    """Endless passkey examples of exactly seq_len + 1 tokens (random depth), as LM examples, sharded."""
    index, count = cfg.shard()
    task = PasskeyConfig(length=cfg.seq_len + 1, num_examples=1 << 30, seed=cfg.seed)
    source = PasskeySource(task, tokenizer)
    source[0]  # fails now, naming the length, if seq_len + 1 cannot hold a passkey prompt
    ds = grain.MapDataset.source(source)[index::count].repeat(None)
    ds = ds.map(_PasskeyToExample(tokenizer.pad_id, cfg.passkey_loss == "answer"))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0))  # examples are cheap: no thread needed


def _slices_as_tuples(state):
    """grain 0.2.x's ConcatThenSplit tests ``slice != (-1, -1)``, so the lists a JSON round trip makes
    (grain's own orbax handler stores JSON) read as a pending remainder and the restored stream is shifted.
    Any ``remainder_slices`` entry goes back to a tuple; everything else is left as is."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in sub.items()} if k == "remainder_slices" and isinstance(sub, dict)
                    else _slices_as_tuples(sub)) for k, sub in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(v) for v in state]
    return state


class _JsonSafeIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(_slices_as_tuples(state))


class _JsonSafeState(grain.IterDataset):
    """Last stage of the pipeline: restores exactly from a state that went through JSON."""

    def __iter__(self):
        return _JsonSafeIterator(self._parent.__iter__())


def lm_dataset(documents: Sequence, tokenizer, cfg: PipelineConfig) -> grain.IterDataset:
    """The pipeline over random-access ``documents`` (a list of str, a ``catalog.TextView``, ...).

    Yields dicts of ``[batch_size, seq_len]`` arrays: ``inputs``, ``targets`` (int32), ``loss_mask``
    (float32, 0 on padding), ``segment_ids`` (document number inside the window, 0 = padding), ``positions``.
    """
    if not isinstance(cfg, PipelineConfig):
        raise TypeError(f"cfg must be PipelineConfig, got {type(cfg).__name__}")
    index, count = cfg.shard()
    if len(documents) < count:
        raise ValueError(f"documents has {len(documents)} entries, fewer than shard_count={count}: some "
                         "processes would get no data; use a larger corpus, or arrays.TokenWindows (which "
                         "shards windows)")
    ds = grain.MapDataset.source(documents)[index::count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs).map(_Tokenize(tokenizer, cfg.add_bos, cfg.add_eos))
    read = grain.ReadOptions(num_threads=min(1, cfg.prefetch_documents),
                             prefetch_buffer_size=cfg.prefetch_documents)
    it = gx.ConcatThenSplitIterDataset(ds.to_iter_dataset(read), length_struct={"tokens": cfg.seq_len + 1})
    if cfg.shuffle and cfg.shuffle_window > 1:
        it = gx.WindowShuffleIterDataset(it, window_size=cfg.shuffle_window, seed=cfg.seed)
    it = it.map(_PackedToExample(tokenizer.pad_id))
    if cfg.passkey_ratio > 0:
        it = grain.IterDataset.mix([it, passkey_windows(tokenizer, cfg)],
                                   weights=[1.0 - cfg.passkey_ratio, cfg.passkey_ratio])
    return _JsonSafeState(it.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder))


def lm_iterator(documents: Sequence, tokenizer, cfg: PipelineConfig) -> grain.DatasetIterator:
    """``iter(lm_dataset(...))``: a grain iterator with ``get_state()`` / ``set_state()``."""
    return iter(lm_dataset(documents, tokenizer, cfg))


def state_to_json(iterator: grain.DatasetIterator) -> str:
    """The iterator's position as JSON text, to store beside a checkpoint (orbax or plain file)."""
    return json.dumps(iterator.get_state(), sort_keys=True)


def state_from_json(iterator: grain.DatasetIterator, text: str) -> grain.DatasetIterator:
    """Moves a freshly made iterator (same documents, tokenizer and config) to the saved position."""
    iterator.set_state(json.loads(text))
    return iterator
