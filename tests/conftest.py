"""Test setup: the JAX platform chosen from the ``-m`` marker expression before JAX starts, 8 CPU host
devices compiled without LLVM's optimizations (``xla_flags.py``), float32 matmuls at full precision, small
seeds.

* A run that selects the ``gpu`` tests and no unmarked ones (``make test-gpu``, ``pytest -m gpu``) runs with
  ``JAX_PLATFORMS=cuda`` and stops at once, with a usage error, when JAX finds no CUDA device; ``-m tpu``
  likewise with ``JAX_PLATFORMS=tpu``.
* Every other run (``make test``, CI) is on the CPU backend with 8 forced host devices; ``gpu``/``tpu`` tests
  that such a run still selects (``-m 'not slow'``) are skipped with a reason unless the backend is theirs.

``JAX_PLATFORMS`` set by the caller wins, but an accelerator run refuses one that leaves its platform out.
JAX is imported only in ``pytest_configure``, after the environment is set.
"""

import os
import pathlib
import re
import sys

import pytest
from xla_flags import FAST_CPU_COMPILE

# `python -m pytest` from the repo root puts the root on sys.path, where `kernels/` (installed as
# `selmerge_jax.kernels`) shadows Hugging Face's `kernels` distribution, which `transformers` imports when it
# is installed: every AutoModel load then fails. The package is installed (editable): the root is not needed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _ROOT]

# marker -> (JAX_PLATFORMS value, names jax.devices()/JAX_PLATFORMS use for it, jax.default_backend())
_ACCELERATORS = {"gpu": ("cuda", {"cuda", "gpu"}, "gpu"), "tpu": ("tpu", {"tpu"}, "tpu")}


def _keeps(markexpr: str, markers: tuple[str, ...]) -> bool:
    """Whether ``-m markexpr`` keeps a test that carries exactly ``markers``."""
    if not markexpr.strip():
        return True
    try:
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(markexpr).evaluate(lambda name, /, **kwargs: name in markers))
    except SyntaxError:
        return True  # pytest reports the malformed expression itself
    except (ImportError, AttributeError, TypeError):  # pytest changed its private parser: the usual forms
        if not markers:
            return not re.fullmatch(r"\s*\w+\s*", markexpr)  # `-m gpu` keeps no unmarked test
        return re.search(rf"(?<!not )\b{markers[0]}\b", markexpr) is not None


def _accelerator_run(config) -> str | None:
    """The accelerator marker that this run targets: one whose tests it keeps while it keeps no unmarked
    test."""
    markexpr = config.option.markexpr or ""
    if _keeps(markexpr, ()):
        return None
    chosen = [m for m in _ACCELERATORS if _keeps(markexpr, (m,))]
    if len(chosen) > 1:
        raise pytest.UsageError(f"-m {markexpr!r} selects both the gpu and the tpu tests; "
                                "run them separately")
    return chosen[0] if chosen else None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    marker = _accelerator_run(config)
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if marker:
        default, names, _ = _ACCELERATORS[marker]
        if platforms and not names & set(platforms.split(",")):
            raise pytest.UsageError(f"-m {config.option.markexpr!r} selects the {marker} tests, but "
                                    f"JAX_PLATFORMS={platforms!r}; unset it or set it to {default!r}")
        os.environ["JAX_PLATFORMS"] = platforms or default
        if os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "numprocesses", None):
            # several processes (xdist's controller and workers) share the device: no 75% preallocation each
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ["JAX_PLATFORMS"] = platforms or "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            flags += " --xla_force_host_platform_device_count=8"
        if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in flags:
            flags += " " + FAST_CPU_COMPILE  # compile time dominates at test shapes (xla_flags.py)
        os.environ["XLA_FLAGS"] = flags.strip()

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if marker:
        try:
            found = jax.devices(_ACCELERATORS[marker][2])
        except Exception as e:  # no such device, or a jaxlib without the plugin (jax then asserts)
            why = str(e) or "no backend for it in this jaxlib"
            raise pytest.UsageError(
                f"-m {config.option.markexpr!r} selects the {marker} tests, which need a {marker.upper()} "
                f"device, and JAX (JAX_PLATFORMS={os.environ['JAX_PLATFORMS']!r}) found none: "
                f"{type(e).__name__}: {why}. Install jax for it (pip install -e '.[cuda]' or '.[tpu]') "
                f"on such a machine, or deselect them (-m 'not {marker}')."
            ) from e
        assert found, f"no {marker} device"
    elif jax.default_backend() == "cpu":
        # Checked here and not only set: a run that silently has 1 device would skip the sharding tests'
        # point.
        assert jax.device_count() == 8, f"expected 8 CPU host devices, got {jax.device_count()}"


def pytest_report_header(config):
    import jax

    devices = jax.devices()
    backend = jax.default_backend()
    return f"jax {jax.__version__}: {backend} backend, {len(devices)} x {devices[0].device_kind}"


def pytest_collection_modifyitems(config, items):
    import jax

    backend = jax.default_backend()
    for marker, (_, _, wanted) in _ACCELERATORS.items():
        if backend != wanted:
            reason = f"needs the {marker} backend (this run is on {backend}): run `pytest -m {marker}`"
            for item in items:
                if item.get_closest_marker(marker):
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def key():
    import jax

    return jax.random.PRNGKey(0)
