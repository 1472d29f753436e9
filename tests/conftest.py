"""Test setup: 8 CPU host devices before JAX starts, float32 matmuls at full precision, small seeds."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    # Checked here and not only set: a test run that silently has 1 device would skip the sharding tests' point.
    if jax.default_backend() == "cpu":
        assert jax.device_count() == 8, f"expected 8 CPU host devices, got {jax.device_count()}"


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
