"""Compression fidelity: the same prompts decoded greedily with a KV-compression setting OFF and ON.

Per prompt and setting: kept ratio (valid cache slots after the prompt over prompt tokens, mean over layers,
rows and kv heads), token-set Jaccard of the two continuations, exact-prefix length (tokens until the first
disagreement) and ROUGE-L F1 (longest common subsequence, on tokens); a summary table averages them.

Decoding goes through the model's own chunked prefill and decode step with its ``cache_fn`` hook set to
``kvcache.step``, which compresses the cache to the policy's budget before appending (prefill chunks and
decode steps alike), attends, and updates the policy's statistics; after the prompt the cache is compressed
once to the budget. With ``policy: none`` it is exactly ``models.generate``'s greedy decode (a test checks
this), so differences between OFF and ON come from compression alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax import kvcache
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
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.generate import SamplingConfig, decode_step, prefill
from selmerge_jax.positional import RopeConfig
from selmerge_jax.training.checkpoint import InitConfig
from selmerge_jax.validation import check_positive_int

__all__ = [
    "CompressedStep",
    "FidelityEvalConfig",
    "compare",
    "compressed_generate",
    "exact_prefix",
    "rouge_l",
    "run_fidelity",
    "setting_name",
    "token_jaccard",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FidelityEvalConfig:
    """``experiments/eval_fidelity.py``: model (``common.ModelSource``), prompts from the held-out split,
    and the compression settings compared against no compression."""

    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    model: ModelConfig | None = None
    rope: RopeConfig | None = None
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prompt_tokens: int = 512
    num_prompts: int = 4
    max_new_tokens: int = 64
    chunk_size: int = 64
    compressions: tuple[KVCompressionConfig, ...] = (KVCompressionConfig(policy="h2o", ratio=0.2),)
    output_dir: str = "runs/eval_fidelity"

    def __post_init__(self):
        for name in ("prompt_tokens", "num_prompts", "max_new_tokens", "chunk_size"):
            check_positive_ints("FidelityEvalConfig", name, [getattr(self, name)])
        if self.prompt_tokens % self.chunk_size:
            raise ValueError(f"FidelityEvalConfig.prompt_tokens={self.prompt_tokens} must be a multiple of "
                             f"chunk_size={self.chunk_size}")
        if not self.compressions:
            raise ValueError("FidelityEvalConfig.compressions must hold at least one setting")
        for c in self.compressions:
            _check_supported(c, self.chunk_size)
        ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)

    @property
    def source(self) -> ModelSource:
        return ModelSource(init=self.init, model=self.model, rope=self.rope, seed=self.seed)


def _check_supported(config: KVCompressionConfig, chunk: int) -> None:
    if not isinstance(config, KVCompressionConfig):
        raise TypeError(f"compression settings must be KVCompressionConfig, got {type(config).__name__}")
    if config.quant != "none":
        raise ValueError(f"compression quant={config.quant!r}: quantized caches are not in this study yet "
                         "(float caches only; use quant='none')")
    if config.layer_budgets is not None:
        raise ValueError("compression layer_budgets: give budget or ratio (one budget for every layer)")
    del chunk


def setting_name(config: KVCompressionConfig) -> str:
    """A short label: ``h2o r=0.2``, ``snapkv b=128 +centroid``."""
    size = f"r={config.ratio:g}" if config.ratio is not None else f"b={config.budget}"
    name = "none" if config.policy == "none" else f"{config.policy} {size}"
    return name + (f" +{config.merge}" if config.merge != "none" else "")


@dataclasses.dataclass(frozen=True)
class CompressedStep:
    """The model's ``cache_fn`` hook under a compression policy: make room (evict/merge down to ``budget``
    when the incoming tokens would not fit), append, attend, update the policy's statistics. A frozen
    dataclass, so it hashes by value and equal settings share one compiled prefill/decode."""

    kv: KVCompressionConfig
    budget: int
    room: bool = True  # False: the caller makes room on its own schedule (see room_every / make_room)

    def __post_init__(self):
        if not isinstance(self.kv, KVCompressionConfig):
            raise TypeError(f"CompressedStep.kv must be a KVCompressionConfig, got {type(self.kv).__name__}")
        check_positive_int("CompressedStep.budget", self.budget)
        if not isinstance(self.room, bool):
            raise TypeError(f"CompressedStep.room must be a bool, got {self.room!r}")

    def __call__(self, cache, q, k, v, positions, *, window=None):
        return kvcache.step(cache, self.kv, q, k, v, positions, budget=self.budget, window=window,
                            room=self.room)

    @property
    def room_every(self) -> int:
        """Decode steps per compression check (0: never compresses). One decode step appends one token, so a
        loop can make room for ``slack`` tokens once and run ``slack`` steps with ``room=False``."""
        return 0 if self.kv.policy == "none" else self.kv.slack

    def make_room(self, caches, incoming: int):
        """Every layer's cache compressed to the budget iff ``incoming`` more tokens would not fit."""
        return type(caches)(kvcache.make_room(c, self.kv, self.budget, incoming) for c in caches)


@functools.partial(jax.jit, static_argnames=("kv", "budget"))
def _finish(caches, *, kv: KVCompressionConfig, budget: int):
    """One-shot compression to the budget after the prompt (SnapKV votes with the prompt's last queries)."""
    if kv.policy == "none":
        return caches
    squeeze = lambda c: jax.lax.cond(c.length > budget, lambda x: kvcache.compress(x, kv, budget),
                                     lambda x: x, c)
    return tuple(squeeze(c) for c in caches)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "cache_fn"))
def _greedy(graphdef, state, caches, first, start, *, steps: int, cache_fn):
    """``first [B]`` then ``steps`` greedy tokens fed back through ``decode_step`` ->
    ``int32 [B, steps + 1]``.

    A compressing ``cache_fn`` checks for room once per ``room_every`` steps, outside the per-token body: a
    ``lax.cond`` inside it made XLA copy every layer's whole cache per token (a cond's pass-through operand is
    copied into its result), 1.2 ms of a 2.0 ms step at 512K on the H100
    (experiments/results/archive/kvcache_README.md).
    """
    model = nnx.merge(graphdef, state)
    layers = model.layer_states()  # sliced once, as generate's decode loop does

    def token(fn):
        def body(carry, i):
            caches, tok = carry
            pos = jnp.full(tok.shape, start, jnp.int32) + i
            nxt, _, caches = decode_step(model, caches, tok, pos, jax.random.key(0), SamplingConfig(), fn,
                                         layers)
            return (caches, nxt), nxt
        return body

    every = cache_fn.room_every if isinstance(cache_fn, CompressedStep) else 0
    if not every:
        _, rest = jax.lax.scan(token(cache_fn), (caches, first), jnp.arange(steps))
        return jnp.concatenate([first[:, None], rest.T], axis=1)
    inner = token(dataclasses.replace(cache_fn, room=False))

    def run(carry, idx):  # idx: the step numbers of one chunk of at most `every` steps
        caches, tok = carry
        return jax.lax.scan(inner, (cache_fn.make_room(caches, every), tok), idx)

    full = steps // every
    carry, rest = jax.lax.scan(run, (caches, first), jnp.arange(full * every).reshape(full, every))
    rest = [rest.reshape(full * every, first.shape[0])]
    if steps % every:
        _, tail = run(carry, jnp.arange(full * every, steps))
        rest.append(tail)
    return jnp.concatenate([first[:, None], jnp.concatenate(rest).T], axis=1)


def _sizes(kv: KVCompressionConfig, prompt_len: int, max_new: int, chunk: int) -> tuple[int, int]:
    """(budget, capacity): no compression keeps everything; otherwise leave room for a whole prefill chunk."""
    if kv.policy == "none":
        return prompt_len + max_new, prompt_len + max_new
    budget = kv.budget_for(prompt_len)
    capacity = budget + max(kv.slack, chunk)
    kv.check_capacity(budget, capacity, chunk)
    return budget, capacity


@functools.partial(jax.jit, static_argnums=tuple(range(7)))
def _empty_caches(kv: KVCompressionConfig, layers: int, batch: int, kv_heads: int, capacity: int,
                  head_dim: int,
                  dtype):
    """One empty compressed cache per layer; module-level jit, so repeated generations reuse the program."""
    return tuple(kvcache.init_for(kv, batch, kv_heads, capacity, head_dim, dtype) for _ in range(layers))


def compressed_generate(model, prompts, kv: KVCompressionConfig, *, max_new_tokens: int,
                        chunk_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuations ``int32 [B, max_new_tokens]`` of prompts ``int [B, T]`` (T a multiple of
    ``chunk_size``) under cache compression ``kv``, and the kept ratio per row ``[B]`` after the prompt."""
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[1] % chunk_size:
        raise ValueError(f"prompts must be int [B, T] with T a multiple of chunk_size={chunk_size}, "
                         f"got shape {prompts.shape}")
    _check_supported(kv, chunk_size)
    b, t = prompts.shape
    cfg = model.config
    budget, capacity = _sizes(kv, t, max_new_tokens, chunk_size)
    caches = _empty_caches(kv, cfg.num_layers, b, cfg.num_kv_heads, capacity, cfg.head_size,
                           jnp.dtype(cfg.jnp_dtype))
    step = CompressedStep(kv, budget)
    logits, caches = prefill(model, prompts, caches, chunk_size=chunk_size, cache_fn=step)
    caches = _finish(caches, kv=kv, budget=budget)
    # [L, B, K] -> [B]
    kept = np.stack([np.asarray(kvcache.num_valid(c)) for c in caches]).mean(axis=(0, 2)) / t
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    graphdef, state = nnx.split(model)
    tokens = _greedy(graphdef, state, caches, first, t, steps=max_new_tokens - 1, cache_fn=step)
    return np.asarray(tokens), kept


def _lcs(a, b) -> int:
    """Length of the longest common subsequence (one DP row at a time: O(len(a) * len(b)) time, O(len(b))
    space)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference, candidate) -> float:
    """ROUGE-L F1 (beta = 1) of two token sequences: 2PR/(P+R) with P, R = LCS over each length."""
    reference, candidate = list(np.asarray(reference).tolist()), list(np.asarray(candidate).tolist())
    if not reference or not candidate:
        return float(reference == candidate)
    lcs = _lcs(reference, candidate)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def token_jaccard(a, b) -> float:
    """|set(a) & set(b)| / |set(a) | set(b)| (1.0 for two empty sequences)."""
    sa, sb = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def exact_prefix(a, b) -> int:
    """Tokens before the first position where ``a`` and ``b`` differ."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def compare(reference, candidate) -> dict:
    return {"jaccard": token_jaccard(reference, candidate),
            "exact_prefix": exact_prefix(reference, candidate),
            "rouge_l": rouge_l(reference, candidate)}


def run_fidelity(cfg: FidelityEvalConfig, *, stop=None) -> dict:
    """Decodes every prompt OFF and ON per setting; writes ``fidelity.json``, ``fidelity.png``,
    ``fidelity.md``.

    ``stop() -> bool`` (optional) is asked before each setting: a time-bounded run ends early with the
    settings done so far, and the JSON is rewritten after every setting so a killed run still leaves them."""
    model = load_model(cfg.source)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tokens = validation_tokens(cfg.data, tokenizer, cfg.num_prompts * cfg.prompt_tokens)
    prompts = tokens.reshape(cfg.num_prompts, cfg.prompt_tokens)
    gen = functools.partial(compressed_generate, model, prompts, max_new_tokens=cfg.max_new_tokens,
                            chunk_size=cfg.chunk_size)
    reference, _ = gen(KVCompressionConfig(policy="none"))
    settings, skipped = [], []
    result = {"study": "fidelity", "attention": model.config.attention, "prompt_tokens": cfg.prompt_tokens,
              "max_new_tokens": cfg.max_new_tokens,
              "reference_texts": [tokenizer.decode(r) for r in reference],
              "settings": settings, "skipped": skipped, **provenance()}
    json_path = os.path.join(cfg.output_dir, "fidelity.json")
    for kv in progress(cfg.compressions, "fidelity: settings", unit="setting"):
        if stop is not None and stop():
            skipped.append(setting_name(kv))
            continue
        out, kept = gen(kv)
        rows = [dict(compare(r, o), kept_ratio=float(k), text=tokenizer.decode(o))
                for r, o, k in zip(reference, out, kept, strict=True)]
        means = {m: float(np.mean([r[m] for r in rows]))
                 for m in ("kept_ratio", "jaccard", "exact_prefix", "rouge_l")}
        settings.append({"name": setting_name(kv), "config": dataclasses.asdict(kv), "mean": means,
                         "prompts": rows})
        write_json(json_path, result)
    write_json(json_path, result)
    png_path = _plot(os.path.join(cfg.output_dir, "fidelity.png"), settings, cfg.max_new_tokens)
    table = summary_table(settings)
    with open(os.path.join(cfg.output_dir, "fidelity.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return {"json": json_path, "png": png_path, "table": table}


def _plot(path: str, settings: list[dict], max_new: int) -> str:
    metrics = {"Jaccard": "jaccard", "ROUGE-L": "rouge_l", f"exact prefix / {max_new}": "exact_prefix",
               "kept ratio": "kept_ratio"}
    values = {label: [s["mean"][m] / (max_new if m == "exact_prefix" else 1) for s in settings]
              for label, m in metrics.items()}
    return plots.bars(path, [s["name"] for s in settings], values, ylabel="mean over prompts (1 = identical)",
                      xlabel="KV-cache compression setting",
                      title="compression fidelity (compressed vs full cache, greedy)")


def summary_table(settings: list[dict]) -> str:
    head = "| setting | kept ratio | Jaccard | exact prefix | ROUGE-L |\n|---|---|---|---|---|"
    rows = [f"| {s['name']} | {s['mean']['kept_ratio']:.3f} | {s['mean']['jaccard']:.3f} | "
            f"{s['mean']['exact_prefix']:.1f} | {s['mean']['rouge_l']:.3f} |" for s in settings]
    return "\n".join([head, *rows])
