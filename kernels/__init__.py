"""Pallas kernels of selmerge_jax, installed as ``selmerge_jax.kernels``.

One folder per op. Kernels import nothing else of the package (they sit below ``attention/``): the selection
plan pytree is defined here and built upstairs.
"""
