"""Long-context evaluation studies; each writes JSON (with device/version provenance) and a PNG.

======================  =================================================  ===============================
study                   library entry point                                script
======================  =================================================  ===============================
passkey grid            ``passkey.run_passkey(PasskeyEvalConfig)``         ``experiments/eval_passkey.py``
perplexity vs length    ``perplexity.run_perplexity(PerplexityEvalConfig)``  ``experiments/eval_perplexity.py``
loss-curve sweep        ``loss_curves.run_loss_curves(LossCurveSweepConfig)``  ``experiments/eval_loss_curves.py``
compression fidelity    ``fidelity.run_fidelity(FidelityEvalConfig)``      ``experiments/eval_fidelity.py``
memory/speed report     ``memory_report.run_memory_report(MemoryReportConfig)``  ``experiments/eval_memory.py``
======================  =================================================  ===============================

Submodules are imported on use (``from selmerge_jax.evaluation import passkey``): the studies pull in the
training runner, TFDS and matplotlib, which a user of one study should not pay for.
"""

__all__ = ["common", "fidelity", "loss_curves", "memory_report", "passkey", "perplexity", "plots"]
