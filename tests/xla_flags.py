"""XLA flags of the CPU test runs (conftest sets them; tests that build a subprocess's environment afresh pass
them on).

At test shapes XLA's CPU compile, not the run, takes the time: without LLVM's optimizations the suite took
23:49 instead of 34:58 on a 2-core machine (1027 tests), and XLA's older loop emitters for fusions (instead
of the MLIR fusion emitters) halve what is left (two test files: 136 s -> 72 s). The flags change the machine
code, not the HLO (float sums may differ in their last bits from an optimized build), so what a test compares
must be built alike: the in-process run and its subprocesses all carry them.
"""

FAST_CPU_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                    "--xla_cpu_use_fusion_emitters=false")
