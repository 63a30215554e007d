"""Import rules between layers, checked on the source of every module.

- rich draws terminal output: only the command line (``uqserve/cli/``) imports
  it; the library reports progress through callbacks (``uqserve._progress``).
- Nothing outside ``uqserve/cli/`` imports ``uqserve.cli``: the library must
  work without its command line.

Imports inside functions count too (lazy imports are still imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import uqserve

PACKAGE = Path(uqserve.__file__).parent
CLI = PACKAGE / "cli"


def _package(path: Path) -> str:
    return ".".join(("uqserve", *path.relative_to(PACKAGE).parent.parts))


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (of ``package``), relative made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in (*parts, base) if p)
            found.append((node.lineno, base))
            # `from uqserve import cli` names the package through an attribute.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _library_modules() -> list[Path]:
    files = sorted(p for p in PACKAGE.rglob("*.py") if CLI not in p.parents)
    assert PACKAGE / "training.py" in files and PACKAGE / "evaluation" / "runner.py" in files
    return files


def _offenders(banned: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in _library_modules()
        for line, module in _imports(path, _package(path))
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
