"""experiments/benchmarks/peak_buffers.py on a real XLA dump (CPU): the buffers alive at the peak, named."""

import os
import subprocess
import sys

from experiment_scripts import load_script

PROGRAM = """
import jax, jax.numpy as jnp
def f(x, w):
    hidden = jnp.tanh(x @ w)  # f32[1024, 1024], made on this line
    return jnp.tanh(hidden @ w) @ w
jax.jit(f).lower(jnp.ones((1024, 1024)), jnp.ones((1024, 1024))).compile()
"""


def _module():
    return load_script("benchmarks/peak_buffers.py")


def test_report_names_the_buffers_at_the_peak_by_source_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_dump_to={tmp_path}"}
    subprocess.run([sys.executable, "-c", PROGRAM], check=True, env=env, timeout=120)
    report = _module().report(str(tmp_path), "jit_f", top=8)
    assert report["module"].startswith("module_") and report["peak_mib"] >= 12.0
    made_here = [b for b in report["buffers"] if b["frame"] == "<string>:4 (f)"]
    assert made_here and made_here[0]["shape"].startswith("f32[1024,1024]") and made_here[0]["mib"] == 4.0
    assert {"where": "<string>:4 (f)", "mib": 4.0} in report["by_source"]
