"""The package's layers point down only (docs/architecture.md): a module imports its own layer or lower ones, and
the two siblings `features` (networks) and `store` (databases) never import each other. Every import counts:
at the top of a module, inside a function (a lazy one) or under TYPE_CHECKING."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "Python" / "image_similarity"

LAYERS = {"errors": 0, "__init__": 0, "core": 1, "resources": 1, "features": 2, "store": 2, "search": 3,
          "pipeline": 4, "contexts": 5, "entrypoints": 6}
"""The layer of each part of the package (its first name under image_similarity/), from the bottom."""
SIBLINGS = {frozenset({"features", "store"})}

KNOWN = {("store.postgres", "features.specs"):
         "a built-in backbone's dimension for pgvector's columns (store/postgres.py _dim), until it is moved"}
"""Imports across the rule kept for now, with why: each must still exist (a fixed one is taken off this list)."""


def _module(path: Path) -> str:
    """'pipeline.rank' for image_similarity/pipeline/rank.py, 'store' for store/__init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _exists(module: str) -> bool:
    path = PACKAGE.joinpath(*module.split("."))
    return bool(module) and (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file())


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module of this package, named relative to it ('' the package's root); line) for every import in
    the file, wherever it is: `from ..x import y` as 'x.y' when y is a module, else as 'x'."""
    module = _module(path).split(".") if _module(path) else []
    package = module if path.name == "__init__.py" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = [*package[: len(package) - node.level + 1], *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "image_similarity":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                target = ".".join([*base, alias.name])
                found.append((target if _exists(target) else ".".join(base), node.lineno))
        elif isinstance(node, ast.Import):
            found += [(".".join(alias.name.split(".")[1:]), node.lineno) for alias in node.names
                      if alias.name.split(".")[0] == "image_similarity"]
    return found


def _part(module: str) -> str:
    return module.split(".")[0] or "__init__"


def against(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported` (both named relative to the package), or None when it may."""
    low, high = _part(importer), _part(imported)
    if LAYERS[high] > LAYERS[low]:
        return f"{high}, {LAYERS[high] - LAYERS[low]} layer(s) up"
    if frozenset({low, high}) in SIBLINGS:
        return f"{high}, its sibling"
    return None


def _crossings() -> dict[tuple[str, str], str]:
    """(importer, imported) -> 'file:line: ...' for each import against the layers."""
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module(path)
        for imported, line in _imports(path):
            if why := against(importer, imported):
                bad[(importer, imported)] = f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} imports " \
                                            f"{imported or 'the package root'} ({why})"
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(_module(p)) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(LAYERS), f"give these a layer: {sorted(parts - set(LAYERS))}"


def test_the_import_reader_finds_relative_and_lazy_imports():
    """The reader resolves `from ..x import y`, `from . import y` and imports inside functions."""
    found = dict(_imports(PACKAGE / "pipeline" / "evaluate.py"))
    assert {"core.dedup", "search.methods", "pipeline.classes", "pipeline.figures"} <= set(found)
    assert "features.runtimes" in dict(_imports(PACKAGE / "pipeline" / "featurize.py"))  # `from ..features import`


def test_the_rule_flags_imports_up_and_across():
    assert against("search.methods", "pipeline.train") == "pipeline, 1 layer(s) up"
    assert against("features.backbones", "store.base") == "store, its sibling"
    assert against("errors", "core.images") == "core, 1 layer(s) up"
    assert against("pipeline.rank", "search.model") is None
    assert against("pipeline.rank", "pipeline.train") is None
    assert against("entrypoints.cli", "") is None  # the package's root: __version__


def test_layers_point_down_and_siblings_stay_apart():
    crossings = _crossings()
    unexpected = [why for key, why in crossings.items() if key not in KNOWN]
    assert not unexpected, "imports against the layers (docs/architecture.md):\n" + "\n".join(unexpected)
    stale = [f"{importer} -> {imported}" for importer, imported in KNOWN if (importer, imported) not in crossings]
    assert not stale, f"no longer imported, take off KNOWN: {stale}"


def test_imports_inside_functions_say_why():
    """The package's own modules are imported at the top of a module, unless a comment says 'lazy: <why>'."""
    unsaid = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for function in ast.walk(ast.parse(text)):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                own = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    "image_similarity"))
                if own and "# lazy: " not in lines[node.lineno - 1]:
                    unsaid.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unsaid, "move these imports to the top, or say 'lazy: <why>':\n" + "\n".join(sorted(set(unsaid)))


NO_TORCH = """
import importlib, importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTorch())
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


def test_the_steps_that_run_no_network_import_without_torch():
    """SQL Server's runtime has no torch (docs/sqlserver-setup.md): the in-database procedures' module, the SQL
    context, the steps and the CLI import where `import torch` fails."""
    modules = ["image_similarity.contexts.inproc", "image_similarity.contexts.sql", "image_similarity.pipeline.steps",
               "image_similarity.entrypoints.cli", "image_similarity.entrypoints.sqlserver"]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *modules], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
