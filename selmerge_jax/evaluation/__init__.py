"""Long-context measurements; each study writes JSON (with device/version provenance) and a PNG.

======================  =======================================================
============================== study                   library entry point
 script ======================  =======================================================
 ==============================
passkey grid            ``passkey.run_passkey(PasskeyEvalConfig)``
``experiments/eval_passkey.py`` perplexity vs length    ``perplexity.run_perplexity(PerplexityEvalConfig)``
  ``experiments/eval_perplexity.py`` compression fidelity    ``fidelity.run_fidelity(FidelityEvalConfig)``
         ``experiments/eval_fidelity.py``
memory/speed report     ``memory_report.run_memory_report(MemoryReportConfig)``
``experiments/eval_memory.py`` loss-curve rows         ``loss_curves.variant_row`` (runs ``main`` trained)
 ``experiments/eval_loss_curves.py`` ======================
 =======================================================  ==============================

Floor 7 (``docs/ARCHITECTURE.md``): a study measures models it is given or loads (``common.load_model``); it
never trains and never imports ``selmerge_jax.main``. Studies that train a family first (the loss-curve sweep,
the reproduction) are entry points of ``selmerge_jax.main``. Submodules are imported on use
(``from selmerge_jax.evaluation import passkey``): a user of one study does not pay for the others.
"""

__all__ = ["common", "fidelity", "loss_curves", "memory_report", "passkey", "perplexity", "plots"]
