"""``experiments/pretrain.py``: build data and model from a :class:`PretrainConfig`, pretrain (resuming the
run in ``train.output_dir`` if there is one), plot the loss curve, summarise; ``main(config)`` does all of it.

The pieces every training entry point shares live here too (``main.finetune``, ``main.demo`` and the
loss-curve sweep use them): the model and data a config describes, the training call, the summary and the loss
curve.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from flax import nnx

from selmerge_jax import data
from selmerge_jax.data.tokenizer import load_tokenizer
from selmerge_jax.main.config import PretrainConfig, config_to_dict
from selmerge_jax.models import Llama, ModelConfig, count_params, load_hf
from selmerge_jax.models.config import parameter_shape_changes
from selmerge_jax.models.lora import apply_lora
from selmerge_jax.models.lora import trainable_filter as lora_filter
from selmerge_jax.sharding import distributed
from selmerge_jax.sharding.mesh import data_shard, make_mesh
from selmerge_jax.training.loop import TrainResult, train
from selmerge_jax.training.metrics import read_jsonl
from selmerge_jax.training.train_step import default_forward

__all__ = [
    "build_model",
    "export_npy",
    "main",
    "make_data",
    "plot_loss_curve",
    "run_pretrain",
    "run_training",
    "train_summary",
    "trainable",
    "with_model_config",
]

_log = logging.getLogger(__name__)


def build_model(cfg: PretrainConfig) -> Llama:
    """A freshly initialised (or HF-loaded) model, with LoRA adapters when the config has a ``lora``
    section."""
    init = getattr(cfg, "init", None)
    if init is not None and init.kind == "hf":
        model = load_hf(init.path, attention=cfg.model.attention, ms=cfg.model.ms,
                        ms_kernel=cfg.model.ms_kernel)
    else:
        model = Llama(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    if getattr(cfg, "lora", None) is not None:
        apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.train.seed + 1))
    return model


def trainable(cfg: PretrainConfig):
    """The NNX filter of what trains: the LoRA adapters with a ``lora`` section, else every parameter."""
    lora = getattr(cfg, "lora", None)
    return lora_filter(lora) if lora is not None else nnx.Param


def _npy(path: str) -> np.ndarray:
    return np.load(os.path.expanduser(path), mmap_mode="r")


def make_data(cfg: PretrainConfig, tokenizer, mesh=None):
    """``(train_iterator, eval_batches_fn)``; both yield the pipeline's ``inputs/targets/loss_mask/...``
    dicts: this process's rows of each global batch (``sharding.mesh.data_shard`` of ``mesh``)."""
    index, count = data_shard(mesh, cfg.train.batch_size)
    per_process = cfg.train.batch_size // count
    t, seed = cfg.train.seq_len, cfg.train.seed
    d = cfg.data
    shard = {"shard_index": index, "shard_count": count}
    if d.train_npy is not None:
        # Passkey prompts replace whole training windows, as in the grain pipeline; validation stays corpus
        # only.
        train_it = data.TokenWindows(_npy(d.train_npy), seq_len=t, batch_size=per_process,
                                     bos_id=tokenizer.bos_id,
                                     seed=seed, passkey_ratio=d.passkey_ratio, tokenizer=tokenizer,
                                     copy_ratio=d.copy_ratio, copy_period=d.copy_period,
                                     passkey_answer_weight=d.passkey_answer_weight,
                                     passkey_min_length=d.passkey_min_length, **shard)
        val = _npy(d.validation_npy)
        return train_it, lambda: data.TokenWindows(val, seq_len=t, batch_size=per_process, num_epochs=1,
                                                   bos_id=tokenizer.bos_id, seed=d.validation_seed, **shard)
    if d.source == "stdlib_corpus":
        data.build_stdlib_corpus(d.data_dir)  # a no-op once built
    train_docs = data.text_source(d.source, d.train_split, d.data_dir)
    val_docs = data.text_source(d.source, d.validation_split, d.data_dir)
    pipe = data.PipelineConfig(seq_len=t, batch_size=per_process, seed=seed, shuffle_window=d.shuffle_window,
                               passkey_ratio=d.passkey_ratio, **shard)
    # Shuffled with a fixed seed: every pass sees the same batches, spread over the split rather than its
    # start.
    val_pipe = dataclasses.replace(pipe, num_epochs=1, passkey_ratio=0.0, seed=d.validation_seed)
    return data.lm_iterator(train_docs, tokenizer, pipe), lambda: data.lm_iterator(val_docs, tokenizer,
                                                                                   val_pipe)


def _strip_packing(batch: dict, step: int) -> dict:
    # Without document masking, tokens attend across packed documents at absolute positions.
    return {k: v for k, v in batch.items() if k not in ("segment_ids", "positions")}


def _mesh(cfg: PretrainConfig):
    distributed.initialize(cfg.mesh)  # a no-op after entry_point; an error if JAX ran before it
    return make_mesh(cfg.mesh) if jax.device_count() > 1 else None


def run_training(cfg: PretrainConfig, model, kind: str, forward=default_forward,
                 step_log=None) -> TrainResult:
    """Trains ``model`` on the data of ``cfg`` (``kind``: "pretrain" or "finetune", kept with the
    checkpoints); validation always runs the model's own forward. ``step_log``: see ``training.train``."""
    cfg.data.require_files()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < the tokenizer's "
                         f"{tokenizer.vocab_size} ids")
    mesh = _mesh(cfg)
    train_it, eval_fn = make_data(cfg, tokenizer, mesh)
    batch_transform = None
    if not cfg.data.document_masking:
        batch_transform = _strip_packing
        raw_eval = eval_fn
        eval_fn = lambda: (_strip_packing(b, 0) for b in raw_eval())
    meta = {"kind": kind, "config": config_to_dict(cfg)}
    return train(model, train_it, train=cfg.train, optimizer=cfg.optimizer, checkpoint=cfg.checkpoint,
                 eval_batches=eval_fn, mesh=mesh, batch_transform=batch_transform, meta=meta,
                 trainable=trainable(cfg), forward=forward, eval_forward=default_forward, step_log=step_log)


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    """Pretrains ``cfg.model`` from scratch (resuming the run in ``cfg.train.output_dir`` if there is one)."""
    return run_training(cfg, build_model(cfg), "pretrain")


def with_model_config(model: Llama, model_cfg: ModelConfig) -> Llama:
    """``model`` (in place) under another ``ModelConfig`` of the same shapes: attention kind, ms settings,
    RoPE rule. Modules read their config at call time, so swapping it on every module is enough (LoRA
    included)."""
    changed = parameter_shape_changes(model.config, model_cfg)
    if changed:
        raise ValueError(f"the model config changes parameter shapes ({', '.join(changed)}): {changed}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "config", None), ModelConfig):
            node.config = model_cfg
    return model


def plot_loss_curve(metrics_path: str, png_path: str, *, reference: float | None = None,
                    reference_label: str = "unigram entropy") -> str:
    """Train (and validation) loss against step from a metrics JSONL, saved as a PNG."""
    import matplotlib  # optional: only the figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: only the figure needs it

    train_lines, val_lines = read_jsonl(metrics_path, key="loss"), read_jsonl(metrics_path, key="val_loss")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(train_lines), [r["loss"] for r in train_lines.values()], label="train loss")
    if val_lines:
        ax.plot(list(val_lines), [r["val_loss"] for r in val_lines.values()], "o-", label="validation loss")
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", label=f"{reference_label} ({reference:.2f})")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)",
           title=os.path.basename(os.path.dirname(png_path)))
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def train_summary(cfg: PretrainConfig, result: TrainResult) -> dict:
    """Key figures of a run: steady-state tokens/s and step time (first log interval, which holds the
    compile, left out when there are others), peak device memory, final validation loss, parameter count."""
    steady = result.history[1:] or result.history
    out = {
        "attention": cfg.model.attention, "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
        "steps": int(result.state.step),
        "tokens": int(result.state.step) * cfg.train.batch_size * cfg.train.seq_len,
        "params": count_params(result.state.params) + count_params(result.state.rest),
        "tokens_per_s": float(np.median([h["tokens_per_s"] for h in steady])) if steady else None,
        "step_time_s": float(np.median([h["step_time_s"] for h in steady])) if steady else None,
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "final_val_loss": result.evals[-1]["val_loss"] if result.evals else None,
        "peak_bytes": max((h.get("peak_bytes", 0) for h in result.history), default=0) or None,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "resumed_from": result.resumed_from,
    }
    return out


def export_npy(cfg: PretrainConfig, out_dir: str) -> dict[str, str]:
    """Tokenizes the train/validation splits of ``cfg.data`` into flat ``.npy`` files (``train.npy``,
    ``validation.npy``) for machines without TFDS/grain; point ``data.train_npy``/``validation_npy`` at
    them."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    d = cfg.data
    if d.source == "stdlib_corpus":
        data.build_stdlib_corpus(d.data_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, name in ((d.train_split, "train"), (d.validation_split, "validation")):
        docs = data.text_source(d.source, split, d.data_dir)
        paths[name] = os.path.join(out_dir, f"{name}.npy")
        np.save(paths[name], data.tokenize_documents(list(docs), tokenizer))
    return paths


@distributed.entry_point
def main(config: PretrainConfig) -> dict:
    """Pretrains, writes ``loss_curve.png`` beside the run's metrics and returns the run's key figures."""
    result = run_pretrain(config)
    out = config.train.output_dir
    plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
    return train_summary(config, result)
