"""The layers of the tree import only downward: every import statement of the two packages, lazy ones included.

    spd_math  <  errors  <  config  <  storage  <  sources  <  analysis, processing  <  deployment  <  defs
              <  service, results, batch_processor  <  cli, notebook

A module may import its own layer and the layers left of it; nothing outside `cli/` imports `cli/`.
The graph is read from the source with `ast` (every `import` and `from ... import`, at any depth).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("spd_math",),
    ("spd_assets.errors",),
    ("spd_assets.config",),
    ("spd_assets.storage",),
    ("spd_assets.sources",),
    ("spd_assets.analysis", "spd_assets.processing"),
    ("spd_assets.deployment",),
    ("spd_assets.defs",),
    ("spd_assets.service", "spd_assets.results", "spd_assets.batch_processor"),
    ("spd_assets.cli", "spd_assets.notebook", "spd_assets"),
]


def layer_of(module: str) -> int:
    """The rank of the layer holding `module` (the longest matching prefix wins)."""
    best, rank = "", None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, index
    assert rank is not None, f"{module} is in no layer"
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of the project's packages in the file."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import module` imports the module when it is one
            found += [(node.lineno, f"{base}.{alias.name}" if (ROOT / (f"{base}.{alias.name}".replace(".", "/"))).exists()
                       or (ROOT / (f"{base}.{alias.name}".replace(".", "/") + ".py")).exists() else base)
                      for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in ("spd_math", "spd_assets")]


def project_files() -> list[Path]:
    return sorted([*ROOT.joinpath("spd_math").rglob("*.py"), *ROOT.joinpath("spd_assets").rglob("*.py")])


def upward_imports() -> list[str]:
    problems = []
    for path in project_files():
        importer = module_name(path)
        for line, imported in imports_of(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {imported}"
            if imported.startswith("spd_assets.cli") and not importer.startswith("spd_assets.cli"):
                problems.append(f"{where} (only the command line imports cli/)")
            elif layer_of(imported) > layer_of(importer):
                problems.append(f"{where} (layer {layer_of(imported)} above {layer_of(importer)})")
    return problems


def test_every_import_runs_down_the_layers():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # A stand-in tree with one storage module importing the service: the check must name it.
    for package in ("spd_assets", "spd_assets/storage", "spd_assets/service", "spd_math"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "spd_assets/service/experiment.py").write_text("def run_experiment(): ...\n")
    (tmp_path / "spd_assets/storage/leak.py").write_text(
        "def f():\n    from spd_assets.service.experiment import run_experiment\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert upward_imports() == ["spd_assets/storage/leak.py:2 imports spd_assets.service.experiment (layer 8 above 3)"]


@pytest.mark.parametrize("module, rank", [("spd_math.merge", 0), ("spd_assets.config.sources", 2),
                                          ("spd_assets.deployment.home", 6), ("spd_assets.cli.main", 9),
                                          ("spd_assets", 9)])
def test_layers_are_ranked_by_longest_prefix(module, rank):
    assert layer_of(module) == rank
