"""Selective decode attention: one query token per (batch row, head) over the cache blocks it selected.

``selective_decode`` (dispatch, ``api.py``), ``selective_decode_reference`` (pure jnp, the oracle) and
``selective_decode_triton`` (Pallas, Triton lowering). The caller is ``kvcache.query_select``, which picks
the blocks and passes its block index as the centroids of the other blocks (one softmax, one launch).
"""

from selmerge_jax.kernels.selective_decode.api import IMPLEMENTATIONS, resolve, selective_decode
from selmerge_jax.kernels.selective_decode.pallas_triton import selective_decode_triton
from selmerge_jax.kernels.selective_decode.reference import check_decode_inputs, selective_decode_reference

__all__ = ["IMPLEMENTATIONS", "check_decode_inputs", "resolve", "selective_decode",
           "selective_decode_reference", "selective_decode_triton"]
