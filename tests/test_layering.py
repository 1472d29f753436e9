"""The floors of docs/ARCHITECTURE.md, checked on the source: a module imports only its own floor and the
floors below it (same-floor imports between packages only without a cycle), and imports sit at module top,
except the few honest optional dependencies of ALLOWED_LOCAL, each with a comment at its import site.

Reads every module of ``selmerge_jax/`` and ``kernels/`` (installed as ``selmerge_jax.kernels``) with ``ast``;
imports nothing of the package, so it runs in a moment.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Bottom up; a module's floor is that of its longest matching prefix. Keep in step with docs/ARCHITECTURE.md.
FLOORS = {
    "selmerge_jax": 0,  # the package's own __init__ (imports nothing)
    "selmerge_jax.typing": 0,
    "selmerge_jax.validation": 0,
    "selmerge_jax.config_io": 0,
    "selmerge_jax.kernels": 1,
    "selmerge_jax.positional": 1,
    "selmerge_jax.attention": 2,
    "selmerge_jax.kvcache": 2,
    "selmerge_jax.sharding": 3,
    "selmerge_jax.layers": 4,
    "selmerge_jax.models": 5,
    "selmerge_jax.data": 5,
    "selmerge_jax.training": 6,
    "selmerge_jax.inference": 6,
    "selmerge_jax.evaluation": 7,
    "selmerge_jax.main": 8,
}

# Function-local imports that may stay: (importing module, imported module) -> why. Each import site carries a
# one-line comment (on its line or the line above) saying the same.
ALLOWED_LOCAL = {
    ("selmerge_jax.kernels.target",
     "jax._src"): "optional: JAX's private config hook, guarded (a context variable stands in without it)",
    ("selmerge_jax.data.catalog", "tensorflow_datasets"): "optional: only TFDS catalog datasets need it",
    ("selmerge_jax.data.catalog",
     "selmerge_jax.data.stdlib_corpus"): "optional: a TFDS builder (imports tfds)",
    ("selmerge_jax.data.catalog", "selmerge_jax.data.text_folder"): "optional: a TFDS builder (imports tfds)",
    ("selmerge_jax.evaluation.plots", "matplotlib"): "optional: only figures need it",
    ("selmerge_jax.evaluation.plots", "matplotlib.pyplot"): "optional: only figures need it",
    ("selmerge_jax.main.pretrain", "matplotlib"): "optional: only the loss-curve figure needs it",
    ("selmerge_jax.main.pretrain", "matplotlib.pyplot"): "optional: only the loss-curve figure needs it",
    ("selmerge_jax.training.metrics",
     "tensorboardX"): "optional: guarded by ImportError, JSONL is the record",
    ("selmerge_jax.training.metrics", "wandb"): "optional: only train.wandb needs it (`pip install wandb`)",
    ("selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu",
     "jax._src.pallas.mosaic_gpu.interpret.params"):
        "private JAX API, present only in some versions; interpret-mode tests only",
    ("selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu",
     "selmerge_jax.kernels.block_sparse_attention.pallas_mosaic_gpu_bwd"):
        "the backward module imports this one (kernels/ keeps the cycle local)",
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    parts = ["selmerge_jax", *rel.parts] if rel.parts[0] == "kernels" else list(rel.parts)
    parts[-1] = parts[-1][:-3]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p
           for p in sorted([*(ROOT / "selmerge_jax").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])
           if "__pycache__" not in p.parts}


def floor(module: str) -> int | None:
    """The floor of a ``selmerge_jax`` module (None for anything outside the package)."""
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else FLOORS[best]


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Modules an import statement loads (``from pkg import sub`` names the submodule when there is one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in SOURCES]
    return subs or [base]


def _imports(module: str, source: str | None = None) -> list[tuple[ast.AST, str, bool]]:
    """``(node, imported module, at module level)`` for every import statement of ``module``."""
    is_package = module in SOURCES and SOURCES[module].name == "__init__.py"
    tree = ast.parse(SOURCES[module].read_text(encoding="utf-8") if source is None else source)
    top = set()

    def visit_top(stmts):
        for stmt in stmts:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                top.add(id(stmt))
            elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
                blocks = [stmt.body, getattr(stmt, "orelse", []), getattr(stmt, "finalbody", [])]
                blocks += [h.body for h in getattr(stmt, "handlers", [])]
                for block in blocks:
                    visit_top(block)

    visit_top(tree.body)
    return [(node, target, id(node) in top) for node in ast.walk(tree) if isinstance(node,
                                                                                     (ast.Import,
                                                                                      ast.ImportFrom))
            for target in _targets(node, module, is_package)]


def test_every_module_has_a_floor():
    assert "selmerge_jax.main.config" in SOURCES
    assert "selmerge_jax.kernels.block_sparse_attention.api" in SOURCES
    assert [m for m in SOURCES if floor(m) is None] == []


def test_no_module_imports_a_floor_above_its_own():
    upward = []
    for module, path in SOURCES.items():
        for node, target, _ in _imports(module):
            if floor(target) is not None and floor(target) > floor(module):
                upward.append(f"{path.relative_to(ROOT)}:{node.lineno} (floor {floor(module)}) imports "
                              f"{target} (floor {floor(target)})")
    assert upward == [], "a lower floor imports an upper one (docs/ARCHITECTURE.md):\n" + "\n".join(upward)


def test_same_floor_packages_form_no_cycle():
    edges = {(_package(m), _package(t)) for m in SOURCES for _, t, _ in _imports(m)
             if floor(t) is not None and _package(t) != _package(m) and floor(t) == floor(m)}
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph.get(start, ()))

    cycles = sorted(f"{a} <-> {b}" for a, b in edges if reaches(b, a))
    assert cycles == [], "packages on one floor import each other in a cycle:\n" + "\n".join(cycles)


def test_no_function_local_imports_outside_the_allow_list():
    local, uncommented = [], []
    for module, path in SOURCES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node, target, at_top in _imports(module):
            if at_top:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno} imports {target}"
            if (module, target) not in ALLOWED_LOCAL:
                local.append(where)
            elif not any("#" in line for line in lines[max(node.lineno - 2, 0):node.end_lineno]):
                uncommented.append(where)
    assert local == [], ("function-local imports (move them to the module top; only honest optional "
                         "dependencies may stay, listed in ALLOWED_LOCAL):\n" + "\n".join(local))
    assert uncommented == [], ("allowed local imports need a one-line comment saying why:\n"
                               + "\n".join(uncommented))


def test_nothing_in_the_package_imports_scripts_or_tests():
    bad = [f"{m} imports {t}" for m in SOURCES for _, t, _ in _imports(m)
           if t.split(".")[0] in ("experiments", "tests", "notebooks")]
    assert bad == []


@pytest.mark.parametrize("script", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_experiment_scripts_stay_one_screen_wrappers(script):
    """``experiments/*.py`` parse arguments and call ``selmerge_jax.main``; logic a test needs lives there."""
    assert len(script.read_text(encoding="utf-8").splitlines()) <= 40, f"{script.name}: more than one screen"
    tree = ast.parse(script.read_text(encoding="utf-8"))
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined == ["main"], f"{script.name} defines {defined}; only main() belongs in a wrapper"


def test_the_walker_sees_upward_relative_and_local_imports():
    source = ("from selmerge_jax.main import config\nfrom . import llama\n"
              "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
              "def f():\n    import selmerge_jax.training\n")
    found = [(target, at_top) for _, target, at_top in _imports("selmerge_jax.models.fake", source)]
    assert found == [("selmerge_jax.main.config", True), ("selmerge_jax.models.llama", True), ("yaml", True),
                     ("selmerge_jax.training", False)]
    assert [floor(t) for t, _ in found] == [8, 5, None, 6] and floor("selmerge_jax.models.fake") == 5
