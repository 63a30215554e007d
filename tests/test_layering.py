"""Import rules between layers, checked on the import graph of every module's source.

The layers, bottom to top (``docs/architecture.md`` draws them):

0. ``errors``, ``contracts``, ``_fs`` and the other small private helpers;
1. the core: ``bundle``, ``uncertainty``, ``volumes``, ``models``, ``data``
   and what builds on them alone (``metrics``, ``checkpoints``, ``training``);
2. ``exporting``, ``serving``, ``runtime`` (the Triton client never imports the
   repository writer: both take the names they share from ``triton_names``);
3. ``prediction`` (and the public API at the package root);
4. ``evaluation``, ``calibration``, ``evaluate``, ``sidecar``;
5. ``cli``: nothing else imports it, and only it imports rich (the library
   reports progress through callbacks, ``uqserve._progress``).

A module imports only from its own layer or below, the import graph has no
cycle, and no module takes a private (``_name``) helper from another package.
Every import counts: inside functions, under ``TYPE_CHECKING``, relative.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import uqserve

PACKAGE = Path(uqserve.__file__).parent
CLI = PACKAGE / "cli"

#: Layer of each top-level name under ``uqserve`` (``""``: the package root).
LAYERS: dict[str, int] = {
    **dict.fromkeys(["errors", "contracts", "_fs", "_failpoints", "_progress", "_version"], 0),
    **dict.fromkeys(["bundle", "uncertainty", "volumes", "models", "data", "schemas"], 1),
    **dict.fromkeys(["metrics", "checkpoints", "training", "triton_names", "reduction"], 1),
    **dict.fromkeys(["exporting", "serving", "runtime"], 2),
    **dict.fromkeys(["prediction", ""], 3),
    **dict.fromkeys(["evaluation", "calibration", "evaluate", "sidecar"], 4),
    "cli": 5,
}
#: Pairs in one layer that must stay apart: (importer, imported).
APART = [("runtime", "serving")]

Graph = dict[str, dict[str, int]]  # module -> {imported module: line}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (of ``package``), relative made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            found.append((node.lineno, base))
            # `from uqserve import cli` names the package through an attribute.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _imported_modules(path: Path, package: str, modules: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` for each module of ``modules`` that ``path`` imports.

    ``from a import b`` imports the module ``a.b`` where there is one, else ``a``.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            names = [f"{base}.{a.name}" for a in node.names]
            names = [n if n in modules else base for n in names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.append((node.lineno, name))
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` names, relative imports made absolute."""
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(p for p in (*parts, base) if p)
    return base


def _private_names(path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """``(line, "module._name")`` for every ``from module import _name`` (not a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [
                (node.lineno, f"{node.module}.{a.name}")
                for a in node.names
                if a.name.startswith("_")
                and not a.name.startswith("__")
                and f"{node.module}.{a.name}" not in modules
            ]
    return found


def import_graph(root: Path = PACKAGE) -> Graph:
    """Module -> the modules of ``root``'s package it imports, by their first line.

    Importing ``a.b.c`` runs the packages ``a.b`` first: those count as
    imported too, except the importer's own packages and the package root
    (whose public names load lazily).
    """
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    graph: Graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for line, module in _imported_modules(path, package, set(files)):
            if module == name:
                continue
            edges.setdefault(module, line)
            parent = module.rpartition(".")[0]
            while parent != top and "." in parent:
                if not (name + ".").startswith(parent + "."):
                    edges.setdefault(parent, line)
                parent = parent.rpartition(".")[0]
        graph[name] = edges
    return graph


def layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    if first not in LAYERS:
        raise AssertionError(f"{module}: no layer; add it to LAYERS in tests/test_layering.py")
    return LAYERS[first]


def cycles(graph: Graph) -> list[list[str]]:
    """The import cycles of ``graph``: one path per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, {}):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph()


def test_every_module_imports_only_its_layer_or_below() -> None:
    offenders = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}), line {line}"
        for a, edges in GRAPH.items()
        for b, line in edges.items()
        if layer(b) > layer(a)
    ]
    assert not offenders, "imports against the layers:\n" + "\n".join(offenders)


@pytest.mark.parametrize(("importer", "imported"), APART)
def test_modules_kept_apart_in_one_layer(importer: str, imported: str) -> None:
    a, b = f"uqserve.{importer}", f"uqserve.{imported}"
    offenders = [
        f"{m} imports {n}, line {line}"
        for m, edges in GRAPH.items()
        if m == a or m.startswith(a + ".")
        for n, line in edges.items()
        if n == b or n.startswith(b + ".")
    ]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles() -> None:
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_helpers_taken_from_another_module() -> None:
    # Private names stay inside their subpackage (``exporting._torch`` -> ``exporting._onnx``);
    # the top-level modules share none (``metrics`` once took ``uncertainty._finite_array``).
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path, PACKAGE)
        own = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, full in _private_names(path, set(GRAPH)):
            source_package = full.rpartition(".")[0].rpartition(".")[0]
            if own == PACKAGE.name or source_package != own:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} takes {full}")
    assert not offenders, "private helpers used outside their package (make them public):\n" + (
        "\n".join(offenders)
    )


def _library_modules() -> list[Path]:
    files = sorted(p for p in PACKAGE.rglob("*.py") if CLI not in p.parents)
    assert (
        PACKAGE / "prediction" / "pipeline.py" in files
        and PACKAGE / "evaluation" / "runner.py" in files
    )
    return files


def _offenders(banned: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in _library_modules()
        for line, module in _imports(path, _module_name(path, PACKAGE).rpartition(".")[0])
        if any(module == b or module.startswith(b + ".") for b in banned)
    ]


def test_only_the_cli_imports_rich() -> None:
    offenders = _offenders(("rich",))
    assert not offenders, "rich outside uqserve/cli/ (report progress via callbacks):\n" + (
        "\n".join(offenders)
    )


def test_the_library_never_imports_the_cli() -> None:
    offenders = _offenders(("uqserve.cli",))
    assert not offenders, "the library imports uqserve.cli:\n" + "\n".join(offenders)


def test_the_scan_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    # The checker itself: imports inside functions, `from uqserve import cli`, relative.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from rich.table import Table\n    from .. import cli\n"
        "    from uqserve import cli as c\n    return Table, cli, c\n"
    )
    modules = [m for _, m in _imports(probe, "uqserve.evaluation")]
    assert "rich.table" in modules and modules.count("uqserve.cli") == 2


def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "uqserve"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_the_graph_sees_type_checking_cycles_and_parent_packages(tmp_path: Path) -> None:
    # A cycle only under TYPE_CHECKING is a cycle; importing a.b.c imports a.b too.
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "bundle.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from uqserve.prediction.report import R\n",
            "prediction/__init__.py": "from uqserve.prediction.report import R\n",
            "prediction/report.py": "from uqserve.bundle import B\n",
            "runtime/base.py": "",
            "runtime/__init__.py": "",
            "evaluation/x.py": "from uqserve.runtime.base import Runtime\n",
        },
    )
    graph = import_graph(pkg)
    assert cycles(graph) == [["uqserve.bundle", "uqserve.prediction", "uqserve.prediction.report"]]
    assert set(graph["uqserve.evaluation.x"]) == {"uqserve.runtime.base", "uqserve.runtime"}
    # A package's own modules do not import the package through its __init__.
    assert set(graph["uqserve.prediction.report"]) == {"uqserve.bundle"}
    assert layer("uqserve.bundle") < layer("uqserve.prediction.report")
