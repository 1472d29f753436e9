"""Frozen configuration of select-and-merge attention, validated on construction."""

import dataclasses
import functools
import logging
from typing import Literal

from selmerge_jax.validation import check_choice, check_int, check_positive_int

__all__ = ["MSAttentionConfig"]

_log = logging.getLogger(__name__)

SelectionSource = Literal["group", "previous"]
SelectionHeads = Literal["query", "kv"]
PositionMode = Literal["before_selection", "selected_original", "selected_compact"]
POSITION_MODES = ("before_selection", "selected_original", "selected_compact")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSAttentionConfig:
    """Select-and-merge attention (arXiv 2410.04211), with the semantics of docs/ARCHITECTURE.md "The
    algorithm".

    Attributes:
      block_size: W, tokens per region (the paper's ``seg``; 16 in its Llama runs).
      top_k: regions each query group attends, *including* its ``merge`` local regions (paper: 512).
      merge: consecutive query regions that share one KV selection (paper: 64).
      selection_source: ``"previous"`` (the default: all members rank with region gs-1; strictly causal, the
        same computation at decode time: what a causal LM trains and decodes with) or ``"group"`` (opt-in, the
        paper's within-group selection: each member ranks with its own summary, so a query's output depends on
        later queries of its group: NOT causal; logged once when a causal config chooses it).
      selection_heads: ``"query"`` (one selection per query head, the paper) or ``"kv"`` (scores averaged over
        the G query heads of a kv head: one selection per kv head).
      sink: the first ``sink`` regions are always selected when they are candidates.
      centroids: also attend one mean-K/mean-V token per unselected candidate region (logit + log W).
      causal: causal attention (candidates strictly before the group, causal local block).
      selection_batch: query groups scored per step of the selection loop (memory/speed knob only; the
        plan does not depend on it). ``None``: as many as keep one step's score matrix under
        ``selection.SCORE_BYTES`` (the ``"previous"`` rule; 16 groups for ``"group"``).
      position_mode: where the layer's ``position_fn`` (RoPE) applies: ``"before_selection"`` (rotate q/k,
        then select: fine-tuning a RoPE model), or only on the selected tokens (pre-training ablation):
        ``"selected_original"`` (select on un-rotated q/k, true positions) or ``"selected_compact"``
        (positions re-indexed inside each group's gathered set; see ``attention/selected_positions.py``).
    """

    block_size: int = 64
    top_k: int = 8
    merge: int = 1
    selection_source: SelectionSource = "previous"
    selection_heads: SelectionHeads = "query"
    sink: int = 0
    centroids: bool = False
    causal: bool = True
    selection_batch: int | None = None
    position_mode: PositionMode = "before_selection"

    def __post_init__(self):
        for name in ("block_size", "top_k", "merge"):
            check_positive_int(f"MSAttentionConfig.{name}", getattr(self, name))
        check_positive_int("MSAttentionConfig.selection_batch", self.selection_batch, allow_none=True)
        if self.top_k < self.merge:
            raise ValueError(f"MSAttentionConfig.top_k={self.top_k} must be >= merge={self.merge} "
                             "(top_k counts the group's own merge regions)")
        if self.top_k % self.merge:
            raise ValueError(f"MSAttentionConfig.top_k={self.top_k} must be a multiple of merge={self.merge}")
        check_choice("MSAttentionConfig.selection_source", self.selection_source, ("group", "previous"))
        check_choice("MSAttentionConfig.selection_heads", self.selection_heads, ("query", "kv"))
        check_choice("MSAttentionConfig.position_mode", self.position_mode, POSITION_MODES)
        if self.position_mode == "selected_compact" and (self.centroids or not self.causal):
            raise ValueError("MSAttentionConfig.position_mode='selected_compact' needs causal=True and "
                             f"centroids=False, got causal={self.causal}, centroids={self.centroids}")
        check_int("MSAttentionConfig.sink", self.sink, 0, self.num_selected)  # [0, top_k - merge]
        if self.selection_source == "group" and self.causal:
            _log_within_group_selection(self.block_size, self.merge)

    @property
    def num_selected(self) -> int:
        """M: selected regions per query group, the local block excluded."""
        return self.top_k - self.merge

    @property
    def group_tokens(self) -> int:
        """Query tokens that share one selection."""
        return self.block_size * self.merge

    @property
    def attended_tokens(self) -> int:
        """Keys a query in a fully selected group can see at most (selected + local)."""
        return self.top_k * self.block_size


@functools.cache
def _log_within_group_selection(block_size: int, merge: int) -> None:
    """Says once per (block_size, merge) that a causal config opted into the paper's non-causal selection."""
    _log.warning("MSAttentionConfig(selection_source='group'): the paper's within-group selection is not "
                 "causal (a query's selection depends on the later queries of its %d-token group); "
                 "selection_source='previous' is the causal choice", block_size * merge)
