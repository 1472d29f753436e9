"""The block-sparse attention registry (``api.py``): which backends are available and why one is not, explicit
requests of an unavailable backend, the default order per platform and its logged choice."""

import logging

import jax
import pytest
from kernel_test_base import inputs

from selmerge_jax.attention import MSAttentionConfig, ms_attention
from selmerge_jax.kernels.block_sparse_attention import (
    api,
    available_implementations,
    block_sparse_attention,
    block_sparse_attention_reference,
    unavailable_implementations,
)
from selmerge_jax.kernels.target import Target, compiling_for

_BROKEN = "selmerge_jax.kernels.block_sparse_attention._no_such_backend"

AMPERE = Target("gpu", compute_capability="8.0", core_count=108)  # a GPU the Mosaic kernels decline


def _inputs():
    return inputs("tiny_g4_h64_w64")[0][:4]  # cached, shared with the backend cases


@pytest.fixture
def fresh_registry(monkeypatch):
    """``api`` as before the first call, with the real modules; a test may point a backend elsewhere."""
    monkeypatch.setattr(api, "_loaded", False)
    monkeypatch.setattr(api, "_UNAVAILABLE", {})
    monkeypatch.setattr(api, "_logged_choices", set())
    monkeypatch.setattr(api, "IMPLEMENTATIONS", {"xla": block_sparse_attention_reference})
    monkeypatch.setattr(api, "_BACKEND_MODULES", dict(api._BACKEND_MODULES))
    return api._BACKEND_MODULES


def test_every_backend_imports_on_this_install():
    """The CI image has every Pallas lowering: a backend that fails to import here is a bug, not a
    fallback."""
    assert unavailable_implementations() == {}
    assert set(available_implementations()) >= {"xla", "pallas_triton", "pallas_mosaic_gpu",
                                                "pallas_mosaic_tpu"}


def test_a_failed_backend_import_is_logged_once_and_reported(fresh_registry, caplog):
    fresh_registry["pallas_triton"] = _BROKEN
    # no IMPLEMENTATION
    fresh_registry["pallas_mosaic_tpu"] = "selmerge_jax.kernels.block_sparse_attention.plan"
    with caplog.at_level(logging.WARNING, logger=api.__name__):
        available = available_implementations()
        unavailable = unavailable_implementations()
        available_implementations()
    assert "pallas_triton" not in available and "pallas_mosaic_tpu" not in available
    assert "pallas_mosaic_gpu" in available
    assert unavailable["pallas_triton"].startswith("ModuleNotFoundError")
    assert "_no_such_backend" in unavailable["pallas_triton"]
    assert unavailable["pallas_mosaic_tpu"].startswith("AttributeError")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # once per backend, however often the registry is asked
    assert "'pallas_triton' is unavailable" in warnings[0] and "_no_such_backend" in warnings[0]


@pytest.mark.parametrize("implementation",
                         ["pallas_triton", ("pallas_triton", "xla"), ("xla", "pallas_triton")])
def test_requesting_an_unavailable_backend_raises_naming_it(fresh_registry, implementation):
    """Named explicitly (alone or anywhere in a sequence), a backend that failed to import is an error with
    the reason, never a silent fall back to the next name."""
    fresh_registry["pallas_triton"] = _BROKEN
    q, k, v, plan = _inputs()
    with pytest.raises(ImportError, match=r"'pallas_triton'.*unavailable.*_no_such_backend"):
        block_sparse_attention(q, k, v, plan, implementation=implementation)


def test_default_order_skips_an_unavailable_backend_and_logs_the_choice(fresh_registry, caplog):
    """implementation=None keeps picking the best available implementation; the choice and what was passed
    over (declined, unavailable) are logged once."""
    fresh_registry["pallas_triton"] = _BROKEN
    # Mosaic declines (no Hopper), Triton is gone
    q, k, v, plan = _inputs()
    with caplog.at_level(logging.INFO, logger=api.__name__), compiling_for(AMPERE):
        for _ in range(2):
            out = block_sparse_attention(q, k, v, plan)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1, info
    assert "uses 'xla'" in info[0] and "pallas_mosaic_gpu: pallas_mosaic_gpu needs a Hopper GPU" in info[0]
    assert "pallas_triton: unavailable (ModuleNotFoundError" in info[0]
    assert (out == block_sparse_attention_reference(q, k, v, plan)).all()


def test_unknown_implementation_is_a_value_error():
    q, k, v, plan = _inputs()
    with pytest.raises(ValueError, match=r"pallas_cuda.*unknown"):
        block_sparse_attention(q, k, v, plan, implementation="pallas_cuda")
    with pytest.raises(ValueError, match="non-empty"):
        block_sparse_attention(q, k, v, plan, implementation=())


def test_dispatch_falls_through_to_triton_off_hopper(monkeypatch):
    """A non-Hopper GPU (traced for on this CPU) declines Mosaic and reaches Triton."""
    calls = []

    def spy(q, k, v, plan, *, scale=None, return_lse=False):
        calls.append("triton")
        return block_sparse_attention_reference(q, k, v, plan, scale=scale, return_lse=return_lse)

    api._load_backends()  # the real backends register first; the spy then replaces Triton for this test only
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_triton", spy)
    q, k, v, plan = _inputs()
    with compiling_for(AMPERE):
        block_sparse_attention(q, k, v, plan)
    assert calls == ["triton"]
    assert api._DEFAULT_ORDER["gpu"] == ("pallas_mosaic_gpu", "pallas_triton", "xla")


def test_ms_attention_default_dispatch_picks_pallas_triton_on_gpu(monkeypatch):
    """``ms_attention(..., implementation=None)`` (and the layer's "pallas") reaches the Triton kernel on
    GPU."""
    calls = []

    def spy(q, k, v, plan, *, scale=None, return_lse=False):
        calls.append(plan.kv_regions.shape)
        return block_sparse_attention_reference(q, k, v, plan, scale=scale, return_lse=return_lse)

    api._load_backends()
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_triton", spy)
    q = jax.random.normal(jax.random.PRNGKey(6), (1, 64, 4, 16))
    k = jax.random.normal(jax.random.PRNGKey(7), (1, 64, 2, 16))
    with compiling_for(AMPERE):
        ms_attention(q, k, k, MSAttentionConfig(block_size=16, top_k=3, selection_heads="kv"))
    assert calls == [(1, 2, 4, 2)]
