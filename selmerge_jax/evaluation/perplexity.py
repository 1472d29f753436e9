"""Perplexity against context length on the held-out split, with chunked prefill so long contexts fit.

For each length L, ``windows`` disjoint windows of L+1 validation tokens are scored (inputs = first L, targets
= the next token at each place). Two ways to run the model:

* ``"chunked"``: the inference path. The window goes through the KV cache ``chunk_size`` tokens at a time
  (``Llama.hidden_states(..., caches=...)`` inside one ``lax.scan``), so the largest attention buffer is
  ``[chunk, L]``: linear in L. The cache attends exactly (dense over the cache) whatever the training
  attention was, which measures what the weights learned, not the attention approximation.
* ``"forward"``: one full forward with the model's own attention (select-and-merge for ``attention: ms``),
  what the training loss saw; memory grows with L (quadratic for dense on XLA).

Besides the mean over the window, the last chunk's perplexity is reported: it is the quantity that should
fall (or at least stay flat) as more context precedes it, and blow up when positions extrapolate badly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from selmerge_jax.data.config import DataConfig
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.evaluation import plots
from selmerge_jax.evaluation.common import (
    ModelSource,
    check_positive_ints,
    load_model,
    progress,
    provenance,
    validation_tokens,
    write_json,
)
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.generate import init_caches
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig
from selmerge_jax.validation import check_choice

__all__ = ["PerplexityEvalConfig", "perplexity_by_length", "run_perplexity", "token_nll"]

Mode = Literal["chunked", "forward"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityEvalConfig:
    """``experiments/eval_perplexity.py``: model (see ``common.ModelSource``), data, lengths and modes."""

    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    model: ModelConfig | None = None
    rope: RopeConfig | None = None
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lengths: tuple[int, ...] = (256, 512, 1024)
    windows: int = 2
    chunk_size: int = 256
    modes: tuple[Mode, ...] = ("chunked",)
    output_dir: str = "runs/eval_perplexity"

    def __post_init__(self):
        check_positive_ints("PerplexityEvalConfig", "lengths", self.lengths)
        check_positive_ints("PerplexityEvalConfig", "windows", [self.windows])
        check_positive_ints("PerplexityEvalConfig", "chunk_size", [self.chunk_size])
        bad = [n for n in self.lengths if n % min(n, self.chunk_size)]
        if bad:
            raise ValueError(f"PerplexityEvalConfig.lengths {bad} are not multiples of "
                             f"chunk_size={self.chunk_size}"
                             " (lengths below chunk_size are scored in one chunk)")
        if not self.modes or any(m not in ("chunked", "forward") for m in self.modes):
            raise ValueError("PerplexityEvalConfig.modes must be a non-empty subset of "
                             "('chunked', 'forward'), "
                             f"got {self.modes!r}")
        ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)

    @property
    def source(self) -> ModelSource:
        return ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _chunked_nll(graphdef, state, caches, inputs, targets, positions):
    """inputs/targets/positions ``[n, B, c]`` chunks -> per-token NLL ``float32 [n, B, c]``."""
    model = nnx.merge(graphdef, state)

    def body(caches, xs):
        tok, tgt, pos = xs
        h, caches = model.hidden_states(tok, pos, caches=caches)
        return caches, optax.softmax_cross_entropy_with_integer_labels(model.output_logits(h), tgt)

    return jax.lax.scan(body, caches, (inputs, targets, positions))[1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward_nll(graphdef, state, inputs, targets):
    logits = nnx.merge(graphdef, state)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def token_nll(model, windows: np.ndarray, *, mode: Mode = "chunked", chunk_size: int = 256) -> np.ndarray:
    """Per-token negative log-likelihood ``float32 [B, L]`` of ``windows int [B, L+1]`` (next-token
    targets)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be int [B, L+1] with L >= 1, got shape {windows.shape}")
    inputs, targets = windows[:, :-1], windows[:, 1:]
    b, length = inputs.shape
    graphdef, state = nnx.split(model)
    if mode == "forward":
        return np.asarray(_forward_nll(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets)))
    check_choice("mode", mode, ("chunked", "forward"))
    c = min(chunk_size, length)
    if length % c:
        raise ValueError(f"window length L={length} must be a multiple of chunk_size={chunk_size}")
    split = lambda x: jnp.asarray(x.reshape(b, length // c, c).transpose(1, 0, 2))
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
    caches = init_caches(model, b, length)
    nll = _chunked_nll(graphdef, state, caches, split(inputs), split(targets), split(positions))
    return np.asarray(nll).transpose(1, 0, 2).reshape(b, length)


def perplexity_by_length(model, tokens: np.ndarray, lengths, *, windows: int, mode: Mode = "chunked",
                         chunk_size: int = 256) -> list[dict]:
    """One row per length: mean NLL, perplexity, last-chunk perplexity, tokens scored, seconds."""
    rows = []
    for length in progress(lengths, f"perplexity ({mode})", unit="length"):
        need = windows * (length + 1)
        if len(tokens) < need:
            raise ValueError(f"{len(tokens)} validation tokens cannot fill {windows} windows of {length + 1}")
        batch = np.asarray(tokens[:need]).reshape(windows, length + 1)
        start = time.perf_counter()
        nll = token_nll(model, batch, mode=mode, chunk_size=chunk_size)
        seconds = time.perf_counter() - start
        tail = nll[:, -min(chunk_size, length):]
        rows.append({"length": int(length), "mode": mode, "mean_nll": float(nll.mean()),
                     "perplexity": math.exp(float(nll.mean())),
                     "last_chunk_perplexity": math.exp(float(tail.mean())),
                     "tokens": int(nll.size), "seconds": seconds})
    return rows


def run_perplexity(cfg: PerplexityEvalConfig) -> dict:
    """Scores every (mode, length); writes ``perplexity.json`` and ``perplexity.png`` into
    ``cfg.output_dir``."""
    model = load_model(cfg.source)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tokens = validation_tokens(cfg.data, tokenizer, cfg.windows * (max(cfg.lengths) + 1))
    rows = [r for mode in cfg.modes for r in perplexity_by_length(model, tokens, cfg.lengths,
                                                                  windows=cfg.windows,
                                                                 mode=mode, chunk_size=cfg.chunk_size)]
    rope = model.config.rope
    result = {"study": "perplexity", "attention": model.config.attention, "rope": dataclasses.asdict(rope),
              "data": cfg.data.source, "split": cfg.data.validation_split, "windows": cfg.windows,
              "chunk_size": cfg.chunk_size, "rows": rows, **provenance()}
    json_path = write_json(os.path.join(cfg.output_dir, "perplexity.json"), result)
    series = {}
    for mode in cfg.modes:
        mine = [r for r in rows if r["mode"] == mode]
        series[f"{mode}: whole window"] = ([r["length"] for r in mine], [r["perplexity"] for r in mine])
        series[f"{mode}: last chunk"] = ([r["length"] for r in mine],
                                         [r["last_chunk_perplexity"] for r in mine])
    png_path = plots.lines(os.path.join(cfg.output_dir, "perplexity.png"), series, xlabel="context tokens",
                           ylabel="perplexity (per token)", logx=True,
                           title=f"perplexity vs context ({model.config.attention}, RoPE {rope.rope_type})")
    return {"json": json_path, "png": png_path,
            "perplexity": {f"{r['mode']}@{r['length']}": round(r["perplexity"], 4) for r in rows}}
