"""``experiments/eval_*.py``: the config class of each evaluation YAML, and ``main(config)`` running the study
that config describes (a measurement of ``selmerge_jax.evaluation``, or a sweep of this floor that trains
first).
"""

from __future__ import annotations

from selmerge_jax.evaluation import fidelity, memory_report, passkey, perplexity
from selmerge_jax.main import loss_curve_sweep, reproduce

__all__ = ["SCHEMAS", "config_schema", "main"]

# Config schema and runner of each ``experiments/configs/eval_<study>.yaml``.
SCHEMAS = {
    "eval_passkey": (passkey.PasskeyEvalConfig, passkey.run_passkey),
    "eval_perplexity": (perplexity.PerplexityEvalConfig, perplexity.run_perplexity),
    "eval_loss_curves": (loss_curve_sweep.LossCurveSweepConfig, loss_curve_sweep.run_loss_curves),
    "eval_fidelity": (fidelity.FidelityEvalConfig, fidelity.run_fidelity),
    "eval_memory": (memory_report.MemoryReportConfig, memory_report.run_memory_report),
    "eval_reproduction": (reproduce.ReproductionConfig, reproduce.run_reproduction),
}


def config_schema(name: str):
    """The config class of an evaluation YAML named ``eval_<study>[_suffix]`` (e.g. ``eval_passkey_crd``)."""
    for prefix in sorted(SCHEMAS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "_"):
            return SCHEMAS[prefix][0]
    raise ValueError(f"no evaluation study for config {name!r}; names start with one of {sorted(SCHEMAS)}")


def main(config) -> dict:
    """Runs the study whose config ``config`` is (any class of :data:`SCHEMAS`) and returns its result."""
    for cls, run in SCHEMAS.values():
        if type(config) is cls:
            return run(config)
    raise TypeError(f"main: {type(config).__name__} is no evaluation config; one of "
                    f"{sorted(cls.__name__ for cls, _ in SCHEMAS.values())}")
