"""Training metrics: JSON lines (always), TensorBoard scalars (via ``tensorboardX`` when installed; no
TensorFlow needed), Weights & Biases when ``train.wandb`` asks for it, and a tqdm progress bar with loss,
tokens/s and ETA.

Only process 0 writes in multi-host runs, so N hosts do not append N copies of every line.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
from tqdm.auto import tqdm

from selmerge_jax.training.config import WandbConfig
from selmerge_jax.validation import UserError

__all__ = ["MetricsWriter", "Progress", "read_jsonl"]

_log = logging.getLogger(__name__)


def _scalar(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


class MetricsWriter:
    """Appends ``{"step": s, **scalars}`` lines to ``<directory>/metrics.jsonl`` and mirrors them to
    TensorBoard.

    Appending (not truncating) keeps the lines of a run that was killed and resumed in one file; readers take
    the last line of each step (see :func:`read_jsonl`).
    """

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True,
                 filename: str = "metrics.jsonl", wandb: WandbConfig | None = None,
                 run_config: dict | None = None):
        self.directory = os.fspath(directory)
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(self.directory, filename)
        self._file = self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(self.directory, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional dependency: the JSONL file is the record
            except ImportError:
                _log.warning("tensorboardX is not installed: metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(os.path.join(self.directory, "tensorboard"))
        if wandb is not None:
            self._wandb = _wandb_run(wandb, self.directory, run_config)

    def write(self, step: int, scalars: dict, prefix: str = ""):
        if not self.enabled:
            return
        record = {"step": int(step), **{prefix + k: _scalar(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wandb_run(config: WandbConfig, directory: str, run_config: dict | None):
    """A W&B run logging into ``directory``; the run id is kept there so a resumed training run continues the
    same W&B run."""
    try:
        import wandb  # optional dependency (`pip install wandb`): only train.wandb needs it
    except ImportError:
        raise UserError("train.wandb is set but the wandb package is not installed: pip install wandb "
                        "(or drop train.wandb)") from None
    id_file = os.path.join(directory, "wandb_run_id")
    run_id = None
    if os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip() or None
    run = wandb.init(project=config.project, name=config.name, entity=config.entity, mode=config.mode,
                     tags=list(config.tags), dir=directory, config=run_config or {}, id=run_id,
                     resume="allow")
    if run_id is None and getattr(run, "id", None):
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(str(run.id))
    return run


def read_jsonl(path: str | os.PathLike, key: str | None = None) -> dict[int, dict]:
    """``{step: record}`` from a metrics file; a step written twice (run resumed before it) keeps its last
    line.

    With ``key``, only records holding that key are returned.
    """
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if key is None or key in record:
                    out[record["step"]] = record
    return dict(sorted(out.items()))


class Progress:
    """tqdm bar over optimizer steps ``[start, total)``; ``update`` shows loss and tokens/s, tqdm gives
    ETA."""

    def __init__(self, start: int, total: int, *, enabled: bool = True, desc: str = "train", file=None):
        self._bar = None
        if enabled and jax.process_index() == 0:
            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                             file=file)

    def update(self, step: int, postfix: dict):
        if self._bar is None:
            return
        # The postfix first: update() redraws the bar, and a postfix set after it would show only at the next
        # redraw, one log interval late.
        self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                              refresh=False)
        if not self._bar.update(step - self._bar.n):  # True when it redrew (tqdm skips redraws < 0.1 s apart)
            self._bar.refresh()

    def close(self):
        if self._bar is not None:
            self._bar.close()
