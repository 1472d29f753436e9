"""What the experiment scripts do, as library functions: build data and model from a config, pretrain,
fine-tune (LoRA, CRD NTK), restore a trained model from its checkpoint directory, plot a loss curve.

Scripts stay a few lines: parse ``--config``/``--set``, call one function here, print the summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from flax import nnx

from selmerge_jax.models import Llama, ModelConfig
from selmerge_jax.models.config import parameter_shape_changes
from selmerge_jax.models.lora import apply_lora
from selmerge_jax.models.lora import trainable_filter as lora_filter
from selmerge_jax.models.tokenizer import load_tokenizer
from selmerge_jax.positional.crd_ntk import CRDNTKConfig
from selmerge_jax.sharding.mesh import initialize_distributed, make_mesh
from selmerge_jax.training.checkpoint import Checkpointer
from selmerge_jax.training.config_loader import from_dict
from selmerge_jax.training.experiment import FinetuneConfig, PretrainConfig, config_to_dict
from selmerge_jax.training.loop import TrainResult, train
from selmerge_jax.training.optimizer import build_optimizer
from selmerge_jax.training.train_step import HiddenStates, StepContext, default_forward, init_train_state

__all__ = [
    "build_model",
    "crd_forward",
    "export_npy",
    "make_data",
    "plot_loss_curve",
    "restore_model",
    "run_finetune",
    "run_pretrain",
    "train_summary",
    "with_model_config",
]

_log = logging.getLogger(__name__)


def build_model(cfg: PretrainConfig) -> Llama:
    """A freshly initialised (or HF-loaded) model, with LoRA adapters when the config has a ``lora`` section."""
    init = getattr(cfg, "init", None)
    if init is not None and init.kind == "hf":
        from selmerge_jax.models import load_hf

        model = load_hf(init.path, attention=cfg.model.attention, ms=cfg.model.ms, ms_kernel=cfg.model.ms_kernel)
    else:
        model = Llama(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    if getattr(cfg, "lora", None) is not None:
        apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.train.seed + 1))
    return model


def _trainable(cfg: PretrainConfig):
    lora = getattr(cfg, "lora", None)
    return lora_filter(lora) if lora is not None else nnx.Param


def _npy(path: str) -> np.ndarray:
    return np.load(os.path.expanduser(path), mmap_mode="r")


def make_data(cfg: PretrainConfig, tokenizer):
    """``(train_iterator, eval_batches_fn)``; both yield the pipeline's ``inputs/targets/loss_mask/...`` dicts."""
    from selmerge_jax import data

    per_process = cfg.train.batch_size // jax.process_count()
    t, seed = cfg.train.seq_len, cfg.train.seed
    d = cfg.data
    if d.train_npy is not None:
        shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
        # Passkey prompts replace whole training windows, as in the grain pipeline; validation stays corpus only.
        train_it = data.TokenWindows(_npy(d.train_npy), seq_len=t, batch_size=per_process, bos_id=tokenizer.bos_id,
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
                               passkey_ratio=d.passkey_ratio)
    # Shuffled with a fixed seed: every pass sees the same batches, spread over the split rather than its start.
    val_pipe = dataclasses.replace(pipe, num_epochs=1, passkey_ratio=0.0, seed=d.validation_seed)
    return data.lm_iterator(train_docs, tokenizer, pipe), lambda: data.lm_iterator(val_docs, tokenizer, val_pipe)


def _strip_packing(batch: dict, step: int) -> dict:
    # Without document masking, tokens attend across packed documents at absolute positions.
    return {k: v for k, v in batch.items() if k not in ("segment_ids", "positions")}


def _mesh(cfg: PretrainConfig):
    initialize_distributed(cfg.mesh)
    return make_mesh(cfg.mesh) if jax.device_count() > 1 else None


def _run(cfg: PretrainConfig, model, kind: str, forward=default_forward) -> TrainResult:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < the tokenizer's {tokenizer.vocab_size} ids")
    train_it, eval_fn = make_data(cfg, tokenizer)
    batch_transform = None
    if not cfg.data.document_masking:
        batch_transform = _strip_packing
        raw_eval = eval_fn
        eval_fn = lambda: (_strip_packing(b, 0) for b in raw_eval())
    meta = {"kind": kind, "config": config_to_dict(cfg)}
    return train(model, train_it, train=cfg.train, optimizer=cfg.optimizer, checkpoint=cfg.checkpoint,
                 eval_batches=eval_fn, mesh=_mesh(cfg), batch_transform=batch_transform, meta=meta,
                 trainable=_trainable(cfg), forward=forward, eval_forward=default_forward)


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    """Pretrains ``cfg.model`` from scratch (resuming the run in ``cfg.train.output_dir`` if there is one)."""
    return _run(cfg, build_model(cfg), "pretrain")


def crd_forward(crd: CRDNTKConfig):
    """The training forward of CRD NTK: every step draws cycled positions (modulo C, random start per row) and
    the stage's NTK base inside the jitted step, from the step's own key, so resume replays them exactly.

    The step's ``CRDPositions`` go through ``Llama.__call__`` like plain positions (every layer's RoPE reads
    its traced frequencies), so the model's remat policy applies as in any other forward. A packed batch
    (``data.document_masking``) keeps its segment mask, and each document's own positions are shifted by the
    row's offset, so documents neither see each other nor start mid-cycle relative to one another.
    """
    from selmerge_jax.positional.crd_ntk import crd_step

    def forward(model: Llama, inputs: dict, ctx: StepContext):
        tokens = inputs["tokens"]
        b, t = tokens.shape
        positions = crd_step(crd, ctx.step, ctx.key, batch=b, seq_len=t, head_dim=model.config.head_size,
                             base_positions=inputs.get("positions"))
        h = model.hidden_states(tokens, positions, segment_ids=inputs.get("segment_ids"))[0]
        return HiddenStates(h, model.output_logits)

    return forward


def run_finetune(cfg: FinetuneConfig) -> TrainResult:
    """Fine-tunes from ``cfg.init`` (our checkpoint, an HF directory or scratch), with LoRA/CRD if configured."""
    if cfg.init.kind == "checkpoint":
        model, _ = restore_model(cfg.init.path, step=cfg.init.step)
        model = with_model_config(model, cfg.model)
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.train.seed + 1))
    else:
        model = build_model(cfg)
    forward = crd_forward(cfg.crd) if cfg.crd is not None else default_forward
    # Validation stays on plain positions with the model's own RoPE: CRD NTK is a training augmentation.
    return _run(cfg, model, "finetune", forward=forward)


def with_model_config(model: Llama, model_cfg: ModelConfig) -> Llama:
    """``model`` (in place) under another ``ModelConfig`` of the same shapes: attention kind, ms settings, RoPE
    rule. Modules read their config at call time, so swapping it on every module is enough (LoRA included)."""
    changed = parameter_shape_changes(model.config, model_cfg)
    if changed:
        raise ValueError(f"the model config changes parameter shapes ({', '.join(changed)}): {changed}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "config", None), ModelConfig):
            node.config = model_cfg
    return model


def restore_model(checkpoint_dir: str, step: int | None = None) -> tuple[Llama, dict]:
    """The trained model of a run (weights of ``step``, default newest) and the run's stored config dict."""
    ckpt = Checkpointer(checkpoint_dir)
    try:
        meta = ckpt.read_meta(step)
        kind = meta.get("kind", "pretrain")
        cls = FinetuneConfig if kind == "finetune" else PretrainConfig
        raw = dict(meta["config"])
        if kind == "finetune":  # weights come from this checkpoint, not from where the fine-tune started
            raw["init"] = {"kind": "scratch"}
        cfg = from_dict(cls, raw)
        tx, _ = build_optimizer(cfg.optimizer, cfg.train.steps)
        # Shapes only: nothing is initialised before the stored arrays arrive.
        target = jax.eval_shape(lambda: init_train_state(build_model(cfg), tx, trainable=_trainable(cfg))[1])
        state, _, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg)), _trainable(cfg), ...)
    return nnx.merge(graphdef, state.params, state.rest), meta["config"]


def plot_loss_curve(metrics_path: str, png_path: str, *, reference: float | None = None,
                    reference_label: str = "unigram entropy") -> str:
    """Train (and validation) loss against step from a metrics JSONL, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selmerge_jax.training.metrics import read_jsonl

    train_lines, val_lines = read_jsonl(metrics_path, key="loss"), read_jsonl(metrics_path, key="val_loss")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(train_lines), [r["loss"] for r in train_lines.values()], label="train loss")
    if val_lines:
        ax.plot(list(val_lines), [r["val_loss"] for r in val_lines.values()], "o-", label="validation loss")
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", label=f"{reference_label} ({reference:.2f})")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=os.path.basename(os.path.dirname(png_path)))
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def train_summary(cfg: PretrainConfig, result: TrainResult) -> dict:
    """Key figures of a run: steady-state tokens/s and step time (first log interval, which holds the
    compile, left out when there are others), peak device memory, final validation loss, parameter count."""
    from selmerge_jax.models import count_params

    steady = result.history[1:] or result.history
    out = {
        "attention": cfg.model.attention, "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
        "steps": int(result.state.step), "tokens": int(result.state.step) * cfg.train.batch_size * cfg.train.seq_len,
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
    ``validation.npy``) for machines without TFDS/grain; point ``data.train_npy``/``validation_npy`` at them."""
    from selmerge_jax import data

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
