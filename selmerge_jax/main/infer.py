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
from selmerge_jax.models.generate import generate, prefill_memory
from selmerge_jax.positional.crd_ntk import CRDNTKConfig
from selmerge_jax.sharding import distributed
from selmerge_jax.training.checkpoint import restore_model

__all__ = ["corpus_prompt", "load_for_inference", "main", "passkey_check", "run_infer"]


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


def _timed_generate(model, prompt, cfg: InferConfig, max_new: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = generate(model, prompt[None], max_new_tokens=max_new, sampling=cfg.sampling,
                   key=jax.random.key(cfg.seed), chunk_size=cfg.chunk_size, eos_ids=())
    tokens = np.asarray(jax.device_get(out.tokens))  # waits for the device
    return tokens, time.perf_counter() - start


def run_infer(cfg: InferConfig) -> dict:
    """Prefill + generate on one prompt; times a 1-token run (≈ prefill) and the full run (prefill + decode),
    both after a warm-up compile, and returns/writes the measurements as one JSON line."""
    model = load_for_inference(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.prompt is not None:
        prompt = tokenizer.encode(cfg.prompt, add_bos=True)
    else:
        prompt = corpus_prompt(cfg, tokenizer, cfg.prompt_tokens)
    _timed_generate(model, prompt, cfg, 1), _timed_generate(model, prompt, cfg, cfg.max_new_tokens)  # compile
    _, prefill_s = _timed_generate(model, prompt, cfg, 1)
    tokens, total_s = _timed_generate(model, prompt, cfg, cfg.max_new_tokens)
    decode_s = max(total_s - prefill_s, 1e-9)
    stats = jax.local_devices()[0].memory_stats() or {}
    result = {
        "attention": model.config.attention, "prompt_tokens": len(prompt), "new_tokens": cfg.max_new_tokens,
        "prefill_s": prefill_s, "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": (cfg.max_new_tokens - 1) / decode_s, "total_s": total_s,
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
