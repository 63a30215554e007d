"""Every function in ``uqserve/`` fits on a screen, or says why it does not.

A function's length is its body without the docstring: from the first
statement to the last line (nested functions count towards the function that
holds them). The signature does not count, so Typer option declarations of a
CLI command and long parameter lists are free. A function may pass the limit
when a ``# long: <why>`` comment stands on the line above its ``def`` (or above
its first decorator).
"""

from __future__ import annotations

import ast
from pathlib import Path

import uqserve

PACKAGE = Path(uqserve.__file__).parent
LIMIT = 80
MARK = "# long:"


def _body_start(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if is_doc and isinstance(first.value.value, str) and len(node.body) > 1:
        return node.body[1].lineno
    return first.lineno


def _too_long(path: Path) -> list[str]:
    """``file:line name (N lines)`` of each function in ``path`` over the limit without a why."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        assert node.end_lineno is not None
        length = node.end_lineno - _body_start(node) + 1
        top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = lines[top - 2].strip() if top >= 2 else ""
        explained = above.startswith(MARK) and len(above) > len(MARK) + 3
        if length > LIMIT and not explained:
            found.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_a_screen_without_saying_why() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "training" / "run.py" in files and PACKAGE / "cli" / "export.py" in files
    offenders = [f for path in files for f in _too_long(path)]
    assert not offenders, (
        f"functions over {LIMIT} lines: split them into named steps, or put a "
        f"`{MARK} <why>` comment above the def:\n" + "\n".join(offenders)
    )


def test_the_checker_counts_bodies_and_honours_the_comment(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    doc = '    """' + "doc\n" * 30 + '    """\n'
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"def fits(\n    a: int,\n    b: int,\n) -> None:\n{doc}{body}\n\n"
        f"def long() -> None:\n{body}    return None\n\n\n"
        f"# long: a table of cases reads best in one piece\n@staticmethod\n"
        f"def explained() -> None:\n{body}    return None\n"
    )
    assert [f.split()[1] for f in _too_long(probe)] == ["long"]


MODULE_LIMIT = 600


def test_no_module_is_longer_than_600_lines() -> None:
    # A module past this holds several jobs: split it into a package named by job
    # (as uncertainty/, training/, runtime/triton/, serving/repository/, sidecar/outputs/).
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MODULE_LIMIT
    }
    assert not long, f"modules over {MODULE_LIMIT} lines: {long}"
