"""RULER-style synthetic retrieval on a small token vocabulary: single-key and multi-key needles, variable
tracking; scored through ``models.generate``'s prefill and decode steps (any prefill, any cache policy).

A prompt is random filler tokens with needles hidden at random depths, then a question ``QUERY k``; the
answer is the value token that ``k`` holds. A needle is one token that stands for a (key, value) pair (every
id range is disjoint, so a key or pair appears only where it is planted):

* ``niah_single``: one pair token ``(k, v)``; ``niah_multikey``: ``needles`` pairs of distinct keys, one
  asked;
* ``variable_tracking`` (RULER's VT): ``(x, v)`` then alias tokens ``y := x`` ... (``hops - 1`` of them, each
  at its own depth); the last alias is asked and its answer is ``v`` (two hops of retrieval).

RULER spells its needles in text ("One of the special magic numbers for X is: N"); one token per pair keeps
the same retrieval (find the needle for this key in a long context, anywhere) learnable by a model of a few
hundred thousand parameters on a CPU in minutes, with no tokenizer and no induction circuit to grow.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax import kvcache
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.models import generate_long as long
from selmerge_jax.models.generate import init_caches, prefill
from selmerge_jax.models.llama import Llama
from selmerge_jax.validation import check_choice, check_int

__all__ = ["PROTOCOLS", "QUERY", "TASKS", "VOCAB", "RulerTask", "accuracy", "examples", "logits_kl"]

QUERY = 1
TASKS = ("niah_single", "niah_multikey", "variable_tracking")
_NK, _NV, _NF = 16, 16, 64  # keys, values, filler ids
_V0 = 8  # values (the answers)
_K0 = _V0 + _NV  # keys (asked)
_P0 = _K0 + _NK  # pair tokens (key k holds value v): _P0 + k * _NV + v
_A0 = _P0 + _NK * _NV  # alias tokens (key y := key x): _A0 + y * _NK + x
_F0 = _A0 + _NK * _NK  # filler
VOCAB = _F0 + _NF


@dataclasses.dataclass(frozen=True, kw_only=True)
class RulerTask:
    """One task: ``name`` in ``TASKS``; ``needles``: planted keys (multi-key: one is asked, the others
    distract); ``hops``: variable-tracking chain length (pairs + aliases)."""

    name: str = "niah_single"
    needles: int = 1
    hops: int = 2

    def __post_init__(self):
        check_choice("RulerTask.name", self.name, TASKS)
        check_int("RulerTask.needles", self.needles, 1, _NK)
        check_int("RulerTask.hops", self.hops, 1, _NK)

    @property
    def vocab_size(self) -> int:
        """The smallest vocabulary that holds every id."""
        return VOCAB

    @property
    def answer_len(self) -> int:
        return 1

    def min_length(self) -> int:
        """The shortest prompt that holds every needle and the question."""
        return (self.hops if self.name == "variable_tracking" else self.needles) + 2 + 8


def examples(task: RulerTask, length: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` prompts ``int32 [count, length]`` (the question at the end) and their answers
    ``int32 [count, 1]``."""
    check_int("length", length, task.min_length())
    check_int("count", count, 1)
    rng = np.random.default_rng(seed)
    prompts = (_F0 + rng.integers(0, _NF, (count, length))).astype(np.int32)
    answers = np.zeros((count, 1), np.int32)
    body = length - 2  # the last two tokens ask
    for i in range(count):
        chain = task.name == "variable_tracking"
        keys = rng.choice(_NK, task.hops if chain else task.needles, replace=False)
        values = rng.integers(0, _NV, len(keys))
        if chain:
            needles = [_P0 + keys[0] * _NV + values[0]]
            needles += [_A0 + keys[h] * _NK + keys[h - 1] for h in range(1, len(keys))]
            asked, answer = keys[-1], values[0]  # the chain's order is kept: each alias after its source
            at = np.sort(rng.choice(body, len(needles), replace=False))
        else:
            needles = [_P0 + k * _NV + v for k, v in zip(keys, values, strict=True)]
            j = int(rng.integers(len(keys)))
            asked, answer = keys[j], values[j]
            at = rng.choice(body, len(needles), replace=False)
        prompts[i, at] = needles
        prompts[i, body:] = (QUERY, _K0 + asked)
        answers[i] = _V0 + answer
    return prompts, answers


PROTOCOLS = ("question_aware", "question_agnostic")


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_fn"), donate_argnames=("caches",))
def _feed(graphdef, state, caches, tokens, start, cache_fn=None):
    """Teacher-forces ``tokens int [B, n]`` at positions ``start + i`` through the caches; the last logits."""
    model = nnx.merge(graphdef, state)
    layers = model.layer_states()  # sliced once, as generate's decode loop does

    def body(caches, step):
        i, token = step
        pos = (start + i)[:, None]
        h, caches = model.hidden_states(token[:, None], pos, caches=caches, cache_fn=cache_fn, layers=layers)
        return caches, model.output_logits(h[:, 0])

    caches, logits = jax.lax.scan(body, caches, (jnp.arange(tokens.shape[1]), tokens.T))
    return logits[-1], caches


def accuracy(model: Llama, prompts: np.ndarray, answers: np.ndarray, *, protocol: str = "question_aware",
             prefill_attention: str = "model", compression: KVCompressionConfig | None = None,
             selection: kvcache.DecodeSelection | None = None, batch: int = 8) -> float:
    """Fraction of prompts answered right when the answer must come from the cache the prefill left.

    The question (the prompt's last two tokens) is fed again *after* the prefill, through decode steps over
    that cache, and the answer is read from the last one's logits, so a compressed cache is what answers
    (the prefill's own last-token logits saw the whole prompt and would hide any eviction).
    ``"question_aware"``: the prefill covers the whole prompt, question included (SnapKV's protocol: its
    observation window holds the question); ``"question_agnostic"``: the prefill covers the context alone
    (kvpress's default: compress the context before the question is known).
    """
    check_choice("protocol", protocol, PROTOCOLS)
    graphdef, state = nnx.split(model)
    right = 0
    for s in range(0, len(prompts), batch):
        rows = np.asarray(prompts[s:s + batch])
        context = rows if protocol == "question_aware" else rows[:, :-2]
        b, t = context.shape
        caches = (long.compressed_caches(model.config, b, compression, t)
                  if compression is not None and compression.policy != "none"
                  else init_caches(model, b, t + 2 if selection is None else -(-(t + 2) // selection.block)
                                   * selection.block))
        _, caches = prefill(model, context, caches, prefill_attention=prefill_attention,
                            compression=compression)
        if selection is not None:
            caches = long.with_selection(caches, selection)
        logits, _ = _feed(graphdef, state, caches, jnp.asarray(rows[:, -2:]), jnp.full((b,), t, jnp.int32),
                          long.decode_cache_fn(compression, selection))
        right += int((np.argmax(np.asarray(logits), -1) == answers[s:s + batch, 0]).sum())
    return right / len(prompts)


def logits_kl(p_logits, q_logits) -> np.ndarray:
    """KL(p || q) per position of two ``[..., V]`` logit arrays (float64)."""
    p_logits, q_logits = (np.asarray(x, np.float64) for x in (p_logits, q_logits))
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)
