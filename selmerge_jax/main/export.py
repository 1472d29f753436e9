"""``selmerge-export``: a trained run's checkpoint as a Hugging Face directory (``config.json`` +
``*.safetensors``) that ``transformers.AutoModelForCausalLM`` loads.

    selmerge-export runs/finetune/checkpoints runs/finetune/hf [--step N] [--dtype float32]

The model is the one the evaluation scripts evaluate (``evaluation.common.load_model``): LoRA adapters are
merged into the base kernels, and a CRD NTK fine-tune gets its fixed-base inference rule (``rope_theta`` of
the written config), so the export reloads with the positions it was evaluated with. What a Hugging Face
Llama cannot express (log-n query scaling, RoPE on the selected tokens only) is refused, never dropped
(``models.hf_import.config_to_hf``). Select-and-merge attention is not part of the file: transformers runs the
weights densely, and the check below compares dense logits.

After writing, the directory is read back with ``models.load_hf`` and its logits on a fixed random batch are
compared with those of the model before merging (float32: max abs difference <= ``tolerance``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selmerge_jax.evaluation.common import ModelSource, load_model, with_config
from selmerge_jax.main.config import print_summary
from selmerge_jax.models import Llama, load_hf, save_hf
from selmerge_jax.models.lora import merge_lora
from selmerge_jax.training.checkpoint import InitConfig
from selmerge_jax.validation import check_choice, check_non_negative_int, check_positive_int, fail

__all__ = ["ExportConfig", "export", "logits_for_check", "main"]

_log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """What ``selmerge-export`` writes.

    Attributes:
      checkpoint: a run's checkpoint directory (``<output_dir>/checkpoints`` of pretrain/finetune).
      step: the checkpoint step (default: the newest).
      output_dir: the Hugging Face directory to write; must be absent or empty unless ``overwrite``.
      dtype: tensor dtype on disk; the logit check is exact (<= ``tolerance``) only for float32.
      max_shard_bytes: split the safetensors file into shards of at most this many bytes (None: one file).
      check_tokens: length of the random batch whose logits are compared after the reload (0: no check).
      tolerance: largest max abs logit difference accepted by the check (float32 export).
      overwrite: replace the files of an existing non-empty ``output_dir``.
    """

    checkpoint: str
    step: int | None = None
    output_dir: str
    dtype: str = "float32"
    max_shard_bytes: int | None = None
    check_tokens: int = 64
    tolerance: float = 1e-4
    overwrite: bool = False

    def __post_init__(self):
        if not os.path.isdir(self.checkpoint):
            fail("ExportConfig.checkpoint", self.checkpoint,
                 "an existing checkpoint directory (a run's <output_dir>/checkpoints)")
        check_non_negative_int("ExportConfig.step", self.step, allow_none=True)
        check_choice("ExportConfig.dtype", self.dtype, DTYPES)
        check_positive_int("ExportConfig.max_shard_bytes", self.max_shard_bytes, allow_none=True)
        check_non_negative_int("ExportConfig.check_tokens", self.check_tokens)
        if os.path.isdir(self.output_dir) and os.listdir(self.output_dir) and not self.overwrite:
            fail("ExportConfig.output_dir", self.output_dir,
                 "absent or empty (it holds files); choose a new directory or pass --overwrite")


def logits_for_check(model: Llama, tokens: np.ndarray) -> np.ndarray:
    """float32 logits ``[1, T, V]`` of ``model`` run densely in float32: what transformers computes from the
    exported weights (select-and-merge and ring attention have no HF form; their weights are a Llama's)."""
    dense = with_config(model, model.config.replace(attention="dense", dtype="float32"))
    return np.asarray(jax.device_get(nnx.jit(lambda m, x: m(x))(dense, jnp.asarray(tokens))), np.float32)


def check_tokens_for(model: Llama, length: int) -> np.ndarray:
    """The fixed random batch of the reload check: ``int32 [1, length]``."""
    length = min(length, model.config.max_seq_len)
    return np.random.default_rng(0).integers(0, model.config.vocab_size, (1, length)).astype(np.int32)


def export(cfg: ExportConfig) -> dict:
    """Writes the HF directory and returns what was written (and the reload check's max abs difference)."""
    model = load_model(ModelSource(init=InitConfig(kind="checkpoint", path=cfg.checkpoint, step=cfg.step)))
    if model.config.attention != "dense":
        _log.warning("attention=%r is not part of a Hugging Face Llama: transformers runs these weights with "
                     "dense attention", model.config.attention)
    tokens = check_tokens_for(model, cfg.check_tokens) if cfg.check_tokens else None
    before = logits_for_check(model, tokens) if tokens is not None else None  # adapters unmerged
    merge_lora(model)
    save_hf(model, cfg.output_dir, dtype=cfg.dtype, max_shard_bytes=cfg.max_shard_bytes)
    rope = model.config.rope
    summary = {"output_dir": cfg.output_dir, "dtype": cfg.dtype, "rope_type": rope.rope_type,
               "rope_factor": rope.factor, "attention_in_checkpoint": model.config.attention,
               "files": sorted(os.listdir(cfg.output_dir))}
    if tokens is not None:
        after = logits_for_check(load_hf(cfg.output_dir, param_dtype="float32"), tokens)
        diff = float(np.abs(after - before).max())
        summary["max_abs_logit_diff"] = diff
        if cfg.dtype == "float32" and not diff <= cfg.tolerance:
            raise RuntimeError(f"the exported model's logits differ from the checkpoint's by {diff:.3g} "
                               f"(> tolerance {cfg.tolerance:g}); {cfg.output_dir} is not a faithful export")
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selmerge-export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run's checkpoint directory, e.g. runs/finetune/checkpoints")
    p.add_argument("output_dir", help="the Hugging Face directory to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="tensor dtype on disk")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="shard the weights (default: one file)")
    p.add_argument("--check-tokens", type=int, default=64,
                   help="tokens of the reload logit check (0 skips it; default 64)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output_dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parses ``argv``, exports, prints one SUMMARY line and returns 0 (a console script's
    exit code); a user's mistake (bad path or value, something without an HF form) exits 2 with one line, not
    a traceback."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = ExportConfig(checkpoint=args.checkpoint, step=args.step, output_dir=args.output_dir,
                           dtype=args.dtype, max_shard_bytes=args.max_shard_bytes,
                           check_tokens=args.check_tokens, overwrite=args.overwrite)
        summary = export(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"selmerge-export: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
