"""The notebooks run: every code cell of every ``notebooks/NN_*.ipynb``, top to bottom, on CPU.

Each notebook runs in its own Python process, as a fresh kernel would: ``04_sharding`` sets up its 8 CPU
devices in its first cell, which only works before JAX starts, and this test process has already started
JAX with conftest's flags. The child gets ``SELMERGE_NOTEBOOK_SMOKE=1`` (the notebooks shrink their sizes),
a headless matplotlib backend and no inherited device-count flag. The ``.ipynb`` files are what users open,
so they are what runs; a separate check keeps them identical to their jupytext ``.py`` sources.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
NAMES = [p.stem for p in SOURCES]

# Runs in the child: executes the code cells of one .ipynb in one namespace, naming the failing cell.
_RUNNER = """
import sys, traceback
import nbformat
path = sys.argv[1]
notebook = nbformat.read(path, as_version=4)
namespace = {"__name__": "__main__"}
for index, cell in enumerate(notebook.cells):
    if cell.cell_type != "code":
        continue
    try:
        exec(compile(cell.source, f"{path} [cell {index}]", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"notebook {path} failed in code cell {index}:\\n{cell.source[:400]}")
print("NOTEBOOK OK")
"""


def _child_env(smoke: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("SELMERGE_CHECKPOINT", None)  # 03 must use its train-free model here
    if smoke:
        env["SELMERGE_NOTEBOOK_SMOKE"] = "1"
    else:
        env.pop("SELMERGE_NOTEBOOK_SMOKE", None)
    return env


def _execute(name: str, smoke: bool, timeout: int):
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(NOTEBOOK_DIR / f"{name}.ipynb")],
                          cwd=NOTEBOOK_DIR, env=_child_env(smoke), capture_output=True, text=True,
                          timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "NOTEBOOK OK" in proc.stdout, f"{name} failed:\n{output[-6000:]}"


def _cells(notebook):
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_the_four_notebooks_exist():
    assert NAMES == ["01_quickstart", "02_what_gets_selected", "03_long_context", "04_sharding"]


def test_readme_commands_are_installed_by_the_notebooks_extra():
    """The README's `jupyter lab` comes from the `notebooks` extra (`jupyterlab` ships the command,
    `ipykernel` the kernel), which both the README's pip line and `make notebooks` install."""
    import tomllib

    root = NOTEBOOK_DIR.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extra = extras["notebooks"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extra}
    assert {"jupyterlab", "ipykernel", "jupytext"} <= names, extra
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    assert 'pip install -e ".[notebooks]"' in readme and "jupyter lab notebooks/" in readme
    assert "make notebooks" in readme
    makefile = (root / "Makefile").read_text()
    target = makefile.split("\nnotebooks:", 1)[1].split("\n\n", 1)[0]
    assert 'pip install -q -e ".[notebooks]"' in target and "jupyter lab notebooks/" in target


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_matches_its_py_source(name):
    source = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    paired = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    assert _cells(paired) == _cells(source), (
        f"notebooks/{name}.ipynb is out of date: run `jupytext --sync notebooks/{name}.py`")
    assert "ipynb" in source.metadata["jupytext"]["formats"] and "py:percent" in \
        source.metadata["jupytext"]["formats"], "the pair must be declared in the jupytext header"


@pytest.mark.parametrize("name", NAMES)
def test_first_cell_says_what_and_how_long(name):
    first = jupytext.read(NOTEBOOK_DIR / f"{name}.py").cells[0]
    assert first.cell_type == "markdown"
    assert "**What it shows.**" in first.source and "**How long.**" in first.source
    assert "laptop CPU" in first.source


def test_readme_links_every_notebook():
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    for name in NAMES:
        assert f"({name}.ipynb)" in readme, f"notebooks/README.md does not link {name}.ipynb"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name):
    _execute(name, smoke=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_full_size(name):
    _execute(name, smoke=False, timeout=1200)
