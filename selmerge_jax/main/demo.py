"""``experiments/demo.py`` (``make demo``): build the embedded corpus, pretrain a tiny select-and-merge model
on CPU, restore it from its checkpoint, generate a continuation, run a passkey check, plot the loss curve and
compare the final loss with the corpus's unigram entropy (the loss of a model that ignores context)."""

from __future__ import annotations

import os
import shutil
import time

import jax
import numpy as np

from selmerge_jax import data
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.main.config import PretrainConfig
from selmerge_jax.main.infer import passkey_check
from selmerge_jax.main.pretrain import plot_loss_curve, run_pretrain, train_summary
from selmerge_jax.models.generate import SamplingConfig, generate
from selmerge_jax.training.checkpoint import restore_model

__all__ = ["main", "run_demo"]


def _corpus(cfg: PretrainConfig):
    start = time.perf_counter()
    builder = data.build_stdlib_corpus(cfg.data.data_dir)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"[1/6] embedded corpus {builder.info.full_name}: {splits} documents "
          f"({time.perf_counter() - start:.1f} s)")
    train_docs = data.text_source(cfg.data.source, cfg.data.train_split, cfg.data.data_dir)
    val_docs = data.text_source(cfg.data.source, cfg.data.validation_split, cfg.data.data_dir)
    return train_docs, val_docs


def _continuation(model, tokenizer, text: str, seed: int) -> str:
    prompt = tokenizer.encode(text, add_bos=True)
    out = generate(model, prompt[None], max_new_tokens=160,
                   sampling=SamplingConfig(temperature=0.7, top_p=0.95),
                   key=jax.random.key(seed), eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
                   chunk_size=64)
    return tokenizer.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]))


def run_demo(cfg: PretrainConfig, *, fresh: bool = True) -> dict:
    """Runs the whole demo and returns its key numbers; ``fresh`` deletes an earlier demo run first."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_docs, val_docs = _corpus(cfg)
    entropy = data.unigram_entropy(train_docs, tokenizer)
    val_entropy = data.unigram_entropy(val_docs, tokenizer)
    print(f"[2/6] unigram entropy (the best context-free loss): train split {entropy:.3f}, validation split "
          f"{val_entropy:.3f} nats/token")
    if fresh and os.path.isdir(cfg.train.output_dir):
        shutil.rmtree(cfg.train.output_dir)
    print(f"[3/6] pretraining {cfg.model.attention} attention, {cfg.train.steps} steps of "
          f"{cfg.train.batch_size}x{cfg.train.seq_len} tokens on {jax.devices()[0].platform}")
    result = run_pretrain(cfg)
    summary, history = train_summary(cfg, result), result.history
    ckpt_dir = cfg.checkpoint.directory or os.path.join(cfg.train.output_dir, "checkpoints")
    model, _ = restore_model(ckpt_dir)
    print(f"[4/6] restored {summary['params']:,} parameters from {ckpt_dir}")
    prompt = val_docs[0][:300]
    print("[5/6] continuation of a validation document:\n----- prompt -----\n" + prompt +
          "\n----- model -----\n" + _continuation(model, tokenizer, prompt, cfg.train.seed) + "\n-----")
    rows = passkey_check(model, tokenizer, [cfg.train.seq_len], [0.25, 0.75], seed=cfg.train.seed,
                         chunk_size=64)
    for r in rows:
        print(f"      passkey len={r['length']} depth={r['depth']}: key {r['passkey']} -> {r['generated']!r} "
              f"(digits right: {r['token_accuracy']:.0%})")
    png = plot_loss_curve(os.path.join(cfg.train.output_dir, "metrics.jsonl"),
                          os.path.join(cfg.train.output_dir, "loss_curve.png"), reference=entropy)
    # Training windows are drawn once each (far less than an epoch), so the train loss is an unbiased estimate
    # on the training distribution; the validation split holds other packages (e.g. codec tables), so it gets
    # its own entropy as the bar.
    train_loss = float(np.mean([h["loss"] for h in history[-5:]]))
    val = summary["final_val_loss"]
    print(f"[6/6] loss curve: {png}\n"
          f"      train loss (last 50 steps) {train_loss:.3f} vs unigram entropy {entropy:.3f} nats/token "
          f"({train_loss / entropy:.0%})\n"
          f"      validation loss            {val:.3f} vs unigram entropy {val_entropy:.3f} nats/token "
          f"({val / val_entropy:.0%}); total {time.perf_counter() - t0:.0f} s")
    return {**summary, "train_loss": train_loss, "unigram_entropy": entropy,
            "val_unigram_entropy": val_entropy,
            "passkey": rows, "loss_curve": png}


def main(config: PretrainConfig) -> dict:
    """:func:`run_demo` from scratch (an earlier demo run in ``train.output_dir`` is deleted first)."""
    return run_demo(config)
