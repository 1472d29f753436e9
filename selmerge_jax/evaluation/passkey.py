"""Passkey retrieval over a (context length x depth) grid: accuracy per cell, JSON and a heat map.

The prompt is the standard one (``selmerge_jax.data.synthetic``: a number hidden at a chosen depth inside
repeated filler, then asked for). Each cell holds ``per_cell`` prompts with different keys; the model decodes
greedily through the library's chunked prefill (``models.generate``), so lengths far beyond the training
context fit in memory, and a prompt counts as retrieved when every answer token matches.

Any position rule can be used at inference by swapping the model's RoPE config (``rope`` in
:class:`PasskeyEvalConfig`), e.g. the CRD NTK fixed-base rule ``{rope_type: ntk, factor: A}`` which gives
``base' = base * A^(d/(d-2))`` with positions unwrapped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax import data
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.evaluation import plots
from selmerge_jax.evaluation.common import (
    ModelSource,
    check_fractions,
    check_positive_ints,
    load_model,
    progress,
    provenance,
    rope_label,
    write_json,
)
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.generate import generate
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig
from selmerge_jax.validation import check_choice

__all__ = ["SCORING_MODES", "PasskeyEvalConfig", "passkey_accuracy", "passkey_prompts", "run_passkey"]

SCORING_MODES = ("generate", "forward")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyEvalConfig:
    """``experiments/eval_passkey.py``: model (init/model/rope/seed as in ``common.ModelSource``), the grid
    and generation settings. ``lengths`` count prompt + answer tokens; ``depths`` in [0, 1] (0 = start)."""

    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    model: ModelConfig | None = None
    rope: RopeConfig | None = None
    seed: int = 0
    tokenizer: str | None = None
    lengths: tuple[int, ...] = (384, 512)
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    per_cell: int = 2
    chunk_size: int = 256
    scoring: str = "generate"
    output_dir: str = "runs/eval_passkey"

    def __post_init__(self):
        check_positive_ints("PasskeyEvalConfig", "lengths", self.lengths, minimum=64)
        check_fractions("PasskeyEvalConfig", "depths", self.depths)
        check_positive_ints("PasskeyEvalConfig", "per_cell", [self.per_cell])
        check_positive_ints("PasskeyEvalConfig", "chunk_size", [self.chunk_size])
        check_choice("PasskeyEvalConfig.scoring", self.scoring, SCORING_MODES)
        ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)  # validates the trio

    @property
    def source(self) -> ModelSource:
        return ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)


def passkey_prompts(tokenizer, length: int, depths, per_cell: int, seed: int) -> list[dict]:
    """``len(depths) * per_cell`` examples of ``length`` tokens: prompt, answer tokens, key and depth."""
    rows = []
    for ex in data.passkey_grid(tokenizer, [length], list(depths), per_cell=per_cell, seed=seed):
        start, end = int(ex["answer_start"]), int(ex["answer_end"])
        rows.append({"prompt": ex["tokens"][:start], "answer": ex["tokens"][start:end],
                     "passkey": int(ex["passkey"]), "depth": float(ex["depth"])})
    return rows


def _decode_batch(model, rows: list[dict], max_new: int, chunk_size: int) -> np.ndarray:
    """Greedy continuations ``[len(rows), max_new]`` of right-padded prompts (one compile per prompt
    width)."""
    lengths = np.array([len(r["prompt"]) for r in rows], np.int32)
    prompts = np.zeros((len(rows), lengths.max()), np.int32)
    for i, r in enumerate(rows):
        prompts[i, :lengths[i]] = r["prompt"]
    out = generate(model, prompts, lengths=lengths, max_new_tokens=max_new, eos_ids=(), chunk_size=chunk_size)
    return np.asarray(out.tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _argmax_at(graphdef, state, tokens, idx):
    """Greedy token ids ``[B, n]`` of a full causal forward of ``tokens [B, T]``, at positions
    ``idx [B, n]``."""
    logits = nnx.merge(graphdef, state)(tokens)
    return jnp.take_along_axis(jnp.argmax(logits, axis=-1), idx, axis=1)


def _forward_batch(model, rows: list[dict], max_new: int) -> np.ndarray:
    """Teacher-forced argmax at each answer position ``[len(rows), max_new]`` from one full forward of the
    whole prompt + answer (the model's own attention, select-and-merge included; -1 past a short answer).

    All-correct under teacher forcing is exactly what greedy decoding retrieves (each token it feeds back is
    then the true one), so ``exact`` equals the generate mode's, without the cache path: that path attends
    densely over the cache whatever ``model.config.attention`` says."""
    tokens = np.stack([np.concatenate([r["prompt"], r["answer"]]) for r in rows]).astype(np.int32)
    starts = np.array([len(r["prompt"]) for r in rows])
    # Logit i predicts token i + 1: the answer's tokens come from positions start - 1 ... start + n - 2.
    idx = np.minimum(starts[:, None] - 1 + np.arange(max_new)[None, :], tokens.shape[1] - 1)
    graphdef, state = nnx.split(model)
    pred = np.array(_argmax_at(graphdef, state, jnp.asarray(tokens), jnp.asarray(idx)))
    for i, r in enumerate(rows):
        pred[i, len(r["answer"]):] = -1
    return pred


def passkey_accuracy(model, tokenizer, lengths, depths, *, per_cell: int = 1, seed: int = 0,
                     chunk_size: int = 256, scoring: str = "generate") -> dict:
    """Runs the grid; returns ``accuracy [len(depths)][len(lengths)]`` (exact retrieval), the per-token
    accuracy grid, per-length wall time and every example's key and decoded continuation.

    ``scoring="generate"``: greedy decoding through the chunked-prefill cache (memory linear in the length;
    the cache attends densely). ``"forward"``: one teacher-forced forward with the model's own attention
    (what a select-and-merge model computes; see ``_forward_batch``)."""
    check_choice("scoring", scoring, SCORING_MODES)
    acc = np.zeros((len(depths), len(lengths)))
    tok_acc = np.zeros_like(acc)
    examples, seconds = [], []
    for j, length in enumerate(progress(lengths, "passkey: lengths", unit="length")):
        rows = passkey_prompts(tokenizer, int(length), depths, per_cell, seed + j)
        max_new = max(len(r["answer"]) for r in rows)
        start = time.perf_counter()
        if scoring == "forward":
            got = _forward_batch(model, rows, max_new)
        else:
            got = _decode_batch(model, rows, max_new, chunk_size)
        seconds.append(time.perf_counter() - start)
        for r, g in zip(rows, got, strict=True):
            hit = g[:len(r["answer"])] == r["answer"]
            i = int(np.argmin(np.abs(np.asarray(depths) - r["depth"])))  # depth comes back as float32
            acc[i, j] += float(hit.all()) / per_cell
            tok_acc[i, j] += float(hit.mean()) / per_cell
            examples.append({"length": int(length), "depth": r["depth"], "passkey": r["passkey"],
                             "generated": tokenizer.decode(np.maximum(g[:len(r["answer"])], 0)),
                             "exact": bool(hit.all())})
    return {"lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths],
            "accuracy": acc.tolist(), "token_accuracy": tok_acc.tolist(), "mean_accuracy": float(acc.mean()),
            "seconds_per_length": seconds, "examples": examples}


def run_passkey(cfg: PasskeyEvalConfig) -> dict:
    """Loads the model, runs the grid, writes ``passkey.json`` and ``passkey.png`` into ``cfg.output_dir``."""
    model = load_model(cfg.source)
    tokenizer = load_tokenizer(cfg.tokenizer)
    result = passkey_accuracy(model, tokenizer, cfg.lengths, cfg.depths, per_cell=cfg.per_cell, seed=cfg.seed,
                              chunk_size=cfg.chunk_size, scoring=cfg.scoring)
    rope = model.config.rope
    label = rope_label(rope)
    result.update(study="passkey", attention=model.config.attention, rope=dataclasses.asdict(rope),
                  per_cell=cfg.per_cell, scoring=cfg.scoring, **provenance())
    json_path = write_json(os.path.join(cfg.output_dir, "passkey.json"), result)
    png_path = plots.heatmap(os.path.join(cfg.output_dir, "passkey.png"), result["accuracy"], rows=cfg.depths,
                             cols=cfg.lengths, row_label="key depth (0 = start)", col_label="context tokens",
                             title=f"passkey retrieval ({model.config.attention}, RoPE {label})")
    return {"json": json_path, "png": png_path, "mean_accuracy": result["mean_accuracy"]}
