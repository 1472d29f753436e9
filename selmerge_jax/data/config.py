"""Where a run's tokens come from: :class:`DataConfig`, the ``data:`` section of every experiment YAML."""

from __future__ import annotations

import dataclasses
import os

from selmerge_jax.validation import UserError, check_non_negative_int, check_number, check_positive_int

__all__ = ["DataConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from.

    Attributes:
      source: a TFDS name (``stdlib_corpus``: the embedded default, built locally on first use; ``pg19``; ...)
        or a prepared TFDS directory. Ignored when ``train_npy`` is set.
      train_split, validation_split: TFDS split strings.
      train_npy, validation_npy: flat pre-tokenized arrays (``.npy``; see ``experiments/pretrain.py
        --export-npy``) read with numpy alone, for machines without TFDS/grain.
      data_dir: TFDS data dir (default ``$SELMERGE_DATA_DIR`` or ``~/.cache/selmerge_jax``).
      tokenizer: null/"byte" for the byte tokenizer, or a path to a ``tokenizer.json`` (or its directory).
      shuffle_window: grain shuffle buffer of windows.
      passkey_ratio: fraction of training windows replaced by passkey-retrieval examples.
      passkey_answer_weight: loss weight of a passkey window's answer tokens (1: like every other token); the
        answer is the only part that needs retrieval (``arrays.TokenWindows``; needs ``train_npy``).
      passkey_min_length: null: one passkey prompt of exactly seq_len + 1 tokens per passkey window (the
      answer
        always at the window's end); an int: each passkey window packs prompts of random lengths in
        [passkey_min_length, seq_len + 1], so answers land at every position (``arrays.TokenWindows``); at
        most (seq_len + 1) // 3, else a window has no room for a second prompt. Train dense models with
        ``document_masking: true`` then: without it each prompt sees the earlier prompts' keys under the same
        question, and the 25M H100 model never learned retrieval (pk4/pk5; with masking it did, pk7-pk9).
      copy_ratio: fraction of training windows replaced by copy rows (a random token string, period drawn
        from ``copy_period``, repeated): an induction-head curriculum that makes passkey retrieval learnable
        from scratch (``arrays.TokenWindows``; needs ``train_npy``).
      document_masking: keep packed-document ``segment_ids``/positions (dense attention only); false lets
        tokens attend across document boundaries at absolute positions, which select-and-merge needs.
      validation_seed: which validation windows are scored (their shuffle). Separate from ``train.seed`` so
      runs
        that differ only in their training seed are compared on the same text.
    """

    source: str = "stdlib_corpus"
    train_split: str = "train"
    validation_split: str = "validation"
    train_npy: str | None = None
    validation_npy: str | None = None
    data_dir: str | None = None
    tokenizer: str | None = None
    shuffle_window: int = 64
    passkey_ratio: float = 0.0
    passkey_answer_weight: float = 1.0
    passkey_min_length: int | None = None
    copy_ratio: float = 0.0
    copy_period: tuple[int, int] = (8, 64)
    document_masking: bool = False
    validation_seed: int = 0

    def __post_init__(self):
        check_non_negative_int("DataConfig.validation_seed", self.validation_seed)
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"DataConfig.source must be a dataset name or directory, got {self.source!r}")
        if (self.train_npy is None) != (self.validation_npy is None):
            raise ValueError(f"DataConfig.train_npy={self.train_npy!r} and validation_npy="
                             f"{self.validation_npy!r}: give both or neither")
        check_positive_int("DataConfig.shuffle_window", self.shuffle_window)
        check_number("DataConfig.passkey_ratio", self.passkey_ratio, 0.0, 1.0, high_open=True)
        if not 0.0 <= self.copy_ratio < 1.0 - self.passkey_ratio:  # relates two fields: said in its own words
            raise ValueError(f"DataConfig.copy_ratio={self.copy_ratio!r} must be in [0, 1 - passkey_ratio = "
                             f"{1.0 - self.passkey_ratio:g})")
        if self.passkey_answer_weight != 1.0 and self.train_npy is None:
            raise ValueError(f"DataConfig.passkey_answer_weight={self.passkey_answer_weight} needs train_npy/"
                             "validation_npy (arrays.TokenWindows); the grain pipeline "
                             "has passkey_loss='answer'")
        if self.passkey_min_length is not None and self.train_npy is None:
            raise ValueError(f"DataConfig.passkey_min_length={self.passkey_min_length} needs train_npy/"
                             "validation_npy (arrays.TokenWindows packs the prompts)")
        if self.copy_ratio > 0 and self.train_npy is None:
            raise ValueError(f"DataConfig.copy_ratio={self.copy_ratio} needs "
                             "train_npy/validation_npy: copy rows "
                             "are mixed by arrays.TokenWindows, the grain pipeline has none")

    def require_files(self, *, train: bool = True) -> None:
        """Raises a one-line :class:`UserError` naming the field when a file this config points at is missing
        (checked before anything compiles; ``train=False`` checks only what evaluation reads)."""
        fields = ("train_npy", "validation_npy", "tokenizer") if train else ("validation_npy", "tokenizer")
        for name in fields:
            path = getattr(self, name)
            if path is None or (name == "tokenizer" and path in ("", "byte", "bytes")):
                continue
            if not os.path.exists(os.path.expanduser(path)):
                raise UserError(f"data.{name}={path!r}: no such file (relative to {os.getcwd()})")
