"""Training metrics: JSON lines (always), TensorBoard scalars (via ``tensorboardX`` when installed; no
TensorFlow needed) and a tqdm progress bar with loss, tokens/s and ETA.

Only process 0 writes in multi-host runs, so N hosts do not append N copies of every line.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
from tqdm.auto import tqdm

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
                 filename: str = "metrics.jsonl"):
        self.directory = os.fspath(directory)
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(self.directory, filename)
        self._file = self._tb = None
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

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        self._file = self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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

    def __init__(self, start: int, total: int, *, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled and jax.process_index() == 0:
            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, postfix: dict):
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                              refresh=False)

    def close(self):
        if self._bar is not None:
            self._bar.close()
