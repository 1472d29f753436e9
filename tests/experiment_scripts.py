"""How tests import a script of ``experiments/`` (a folder of scripts, not a package): by its path, registered
in ``sys.modules`` under its file name, because dataclasses look their module up while the class is built."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """The module of ``experiments/<relpath>`` (e.g. ``"benchmarks/bench_inference.py"``), executed."""
    path = ROOT / "experiments" / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
