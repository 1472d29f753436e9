"""Long-context evaluation studies; each writes JSON (with device/version provenance) and a PNG.

======================  =================================================  ===============================
study                   library entry point                                script
======================  =================================================  ===============================
passkey grid            ``passkey.run_passkey(PasskeyEvalConfig)``         ``experiments/eval_passkey.py``
perplexity vs length    ``perplexity.run_perplexity(PerplexityEvalConfig)``  ``experiments/eval_perplexity.py``
loss-curve sweep        ``loss_curves.run_loss_curves(LossCurveSweepConfig)``  ``experiments/eval_loss_curves.py``
compression fidelity    ``fidelity.run_fidelity(FidelityEvalConfig)``      ``experiments/eval_fidelity.py``
memory/speed report     ``memory_report.run_memory_report(MemoryReportConfig)``  ``experiments/eval_memory.py``
all claims, time-bound  ``reproduction.run_reproduction(ReproductionConfig)``  ``experiments/eval_reproduction.py``
======================  =================================================  ===============================

Submodules are imported on use (``from selmerge_jax.evaluation import passkey``): the studies pull in the
training runner, TFDS and matplotlib, which a user of one study should not pay for.
"""

__all__ = ["common", "config_schema", "fidelity", "loss_curves", "memory_report", "passkey", "perplexity", "plots",
           "reproduction"]

# Config schema of each ``experiments/configs/eval_<study>.yaml`` (module, class), imported on use.
_SCHEMAS = {
    "eval_passkey": ("passkey", "PasskeyEvalConfig"),
    "eval_perplexity": ("perplexity", "PerplexityEvalConfig"),
    "eval_loss_curves": ("loss_curves", "LossCurveSweepConfig"),
    "eval_fidelity": ("fidelity", "FidelityEvalConfig"),
    "eval_memory": ("memory_report", "MemoryReportConfig"),
    "eval_reproduction": ("reproduction", "ReproductionConfig"),
}


def config_schema(name: str):
    """The config class of an evaluation YAML named ``eval_<study>[_suffix]`` (e.g. ``eval_passkey_crd``)."""
    import importlib

    for prefix in sorted(_SCHEMAS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "_"):
            module, cls = _SCHEMAS[prefix]
            return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    raise ValueError(f"no evaluation study for config {name!r}; names start with one of {sorted(_SCHEMAS)}")
