"""``experiments/infer.py``: load a trained model, prefill a long prompt, generate, measure; a passkey
retrieval check. ``main(config)`` runs an :class:`InferConfig` and returns (and appends to ``output``) its
measurements."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx

from selmerge_jax import data
from selmerge_jax.config_io import from_dict
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.main.config import InferConfig
from selmerge_jax.main.pretrain import with_model_config
from selmerge_jax.models import Llama, load_hf
from selmerge_jax.models.generate import decode, generate, init_caches, prefill, prefill_memory
from selmerge_jax.positional.crd_ntk import CRDNTKConfig
from selmerge_jax.sharding import distributed
from selmerge_jax.training.checkpoint import restore_model

__all__ = ["corpus_prompt", "load_for_inference", "main", "passkey_check", "run_infer", "speeds",
           "timed_generation"]


def load_for_inference(cfg: InferConfig) -> Llama:
    if cfg.init.kind == "checkpoint":
        model, stored = restore_model(cfg.init.path, step=cfg.init.step)
        if cfg.model is not None:  # e.g. the same weights with another attention implementation
            return with_model_config(model, cfg.model)
        if stored.get("crd"):  # a CRD NTK fine-tune: infer with its fixed-base rule at unwrapped positions
            crd = from_dict(CRDNTKConfig, stored["crd"], "crd")
            return with_model_config(model, model.config.replace(rope=crd.inference_rope_config()))
        return model
    if cfg.init.kind == "hf":
        return load_hf(cfg.init.path, attention=cfg.model.attention, ms=cfg.model.ms,
                       ms_kernel=cfg.model.ms_kernel)
    return Llama(cfg.model, rngs=nnx.Rngs(cfg.seed))


def corpus_prompt(cfg: InferConfig, tokenizer, length: int) -> np.ndarray:
    """The first ``length`` tokens of the validation split (documents joined with bos/eos)."""
    if cfg.data.validation_npy is not None:
        tokens = np.load(cfg.data.validation_npy, mmap_mode="r")
        return np.asarray(tokens[:length], np.int32)
    if cfg.data.source == "stdlib_corpus":
        data.build_stdlib_corpus(cfg.data.data_dir)
    docs = data.text_source(cfg.data.source, cfg.data.validation_split, cfg.data.data_dir)
    parts, total = [], 0
    for doc in docs:
        parts.append(tokenizer.encode(doc, add_bos=True, add_eos=True))
        total += len(parts[-1])
        if total >= length:
            break
    tokens = np.concatenate(parts)[:length].astype(np.int32)
    if len(tokens) < length:
        raise ValueError(f"the validation split has only {len(tokens)} tokens; prompt_tokens={length}")
    return tokens


def passkey_check(model: Llama, tokenizer, lengths, depths, *, seed: int = 0,
                  chunk_size: int = 256) -> list[dict]:
    """Greedy passkey retrieval per (length, depth): the digits generated after the question vs the key."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            ex = data.passkey_example(tokenizer, int(length), float(depth),
                                      int(rng.integers(10_000, 100_000)))
            start, end = ex["answer_start"], ex["answer_end"]
            prompt, answer = ex["tokens"][:start], ex["tokens"][start:end]
            out = generate(model, prompt[None], max_new_tokens=len(answer), eos_ids=(), chunk_size=chunk_size)
            got = np.asarray(out.tokens[0, :len(answer)])
            rows.append({"length": int(length), "depth": float(depth), "passkey": int(ex["passkey"]),
                         "generated": tokenizer.decode(got), "exact": bool((got == answer).all()),
                         "token_accuracy": float((got == answer).mean())})
    return rows


def timed_generation(model, prompt: np.ndarray, cfg: InferConfig) -> tuple[np.ndarray, dict]:
    """Generates ``cfg.max_new_tokens`` after ``prompt`` with prefill and decode timed apart, each ended by
    ``block_until_ready`` (dispatch is asynchronous: without it a timer stops before the device has worked).

    Runs twice and times the second run (the first compiles). Returns the tokens ``[1, new]`` and the timings:
    ``prefill_s`` (the prompt into the cache, ending with the logits the first token is sampled from, so it is
    also the time to first token), ``decode_s`` (the other ``new - 1`` tokens) and ``first_run_s`` (compile +
    run).
    """
    padded = -(-len(prompt) // cfg.chunk_size) * cfg.chunk_size
    capacity = padded + cfg.max_new_tokens - 1

    def run() -> tuple[np.ndarray, float, float]:
        caches = jax.block_until_ready(init_caches(model, 1, capacity))
        t0 = time.perf_counter()
        logits, caches = prefill(model, prompt[None], caches, chunk_size=cfg.chunk_size)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        out, _ = decode(model, caches, logits, np.array([len(prompt)]), max_new_tokens=cfg.max_new_tokens,
                        sampling=cfg.sampling, key=jax.random.key(cfg.seed), eos_ids=())
        tokens = np.asarray(jax.block_until_ready(out.tokens))
        return tokens, t1 - t0, time.perf_counter() - t1

    t = time.perf_counter()
    run()
    first_run_s = time.perf_counter() - t
    tokens, prefill_s, decode_s = run()
    return tokens, {"prefill_s": prefill_s, "decode_s": decode_s, "first_run_s": first_run_s}


def speeds(prompt_tokens: int, new_tokens: int, timing: dict) -> dict:
    """Tokens/s of prefill and decode and the time to first token from ``timed_generation``'s timings. The
    first new token comes from the prefill's logits, so decode makes ``new - 1`` tokens (None when 0)."""
    prefill_s, decode_s = timing["prefill_s"], timing["decode_s"]
    return {**timing, "time_to_first_token_s": prefill_s, "total_s": prefill_s + decode_s,
            "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None}


def run_infer(cfg: InferConfig) -> dict:
    """Prefill + generate on one prompt, prefill and decode timed apart after a warm-up compile
    (``timed_generation``); returns/writes the measurements as one JSON line."""
    model = load_for_inference(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.prompt is not None:
        prompt = tokenizer.encode(cfg.prompt, add_bos=True)
    else:
        prompt = corpus_prompt(cfg, tokenizer, cfg.prompt_tokens)
    tokens, timing = timed_generation(model, np.asarray(prompt, np.int32), cfg)
    stats = jax.local_devices()[0].memory_stats() or {}
    result = {
        "attention": model.config.attention, "prompt_tokens": len(prompt), "new_tokens": cfg.max_new_tokens,
        **speeds(len(prompt), cfg.max_new_tokens, timing),
        "planned_prefill_bytes": prefill_memory(model, batch=1, prompt_len=len(prompt),
                                                chunk_size=cfg.chunk_size)["peak"],
        "peak_bytes": stats.get("peak_bytes_in_use"), "device": jax.devices()[0].device_kind,
        "continuation": tokenizer.decode(tokens[0]),
    }
    if cfg.passkey is not None:
        result["passkey"] = passkey_check(model, tokenizer, cfg.passkey.lengths, cfg.passkey.depths,
                                          seed=cfg.seed, chunk_size=cfg.chunk_size)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    with open(cfg.output, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


@distributed.entry_point
def main(config: InferConfig) -> dict:
    """:func:`run_infer`: the measurements of one prefill + generate run."""
    return run_infer(config)
