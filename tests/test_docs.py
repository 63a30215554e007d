"""The docs site: its Python examples run as written, and every page is in the nav."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
WITH_EXAMPLES = [p for p in PAGES if ">>> " in p.read_text()]


def test_docs_have_examples() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in WITH_EXAMPLES}
    assert {"concepts/uncertainty.md", "concepts/bundles.md", "reference/schemas.md"} <= names


@pytest.mark.parametrize("page", WITH_EXAMPLES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_docs_examples_run(page: Path) -> None:
    result = doctest.testfile(
        str(page), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False
    )
    assert result.attempted > 0
    assert result.failed == 0


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert pages == listed, f"not in nav: {pages - listed}; missing pages: {listed - pages}"


#: Folders that are no part of the project's sources (what .gitignore leaves out).
NOT_SOURCES = {".git", ".venv", "site", "build", "dist", "__pycache__", ".pytest_cache",
               ".mypy_cache", ".ruff_cache", ".hypothesis", "uqserve-out"}  # fmt: skip


def project_files(root: Path) -> list[str]:
    """The project's files: git's list in a checkout, else a walk that skips ``NOT_SOURCES``.

    An unpacked source archive (``pip download``, a release tarball) has no ``.git``.
    """
    import subprocess

    if (root / ".git").exists():
        return subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and not any(
            part in NOT_SOURCES or part.endswith(".egg-info") for part in p.relative_to(root).parts
        )
    )


def test_project_files_outside_a_git_checkout(tmp_path: Path) -> None:
    for rel in ("README.md", "docs/index.md", ".venv/lib/x.py", "site/index.html", "a.egg-info/P"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert project_files(tmp_path) == ["README.md", "docs/index.md"]


def test_nothing_cites_files_outside_the_repository() -> None:
    """The project stands alone: no design notes or shared folders outside it are cited."""
    outside = ("science" + ".md", "DESIGN" + ".md", "/work/" + "shared")  # not cited by this file
    hits = []
    for name in project_files(ROOT):
        path = ROOT / name
        if path.suffix in {".png", ".onnx", ".gz", ".nii", ".dcm"} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}: {word}" for word in outside if word in text]
    assert not hits, hits


@pytest.mark.slow  # the whole site; `make docs` (CI) builds it too
def test_site_builds_strict(tmp_path: Path) -> None:
    """`make docs` in a test: broken links or anchors, and pages left out of the nav, fail."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    warnings = [line for line in proc.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0, "\n".join(warnings) or proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli.html").is_file()
    # Opened from disk (file://), links must name files, not folders.
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'href="getting-started.html"' in index and 'href="getting-started/"' not in index
    # The API page renders its docstrings: no RST tables, literal-block markers or roles.
    api = (tmp_path / "site" / "reference" / "python.html").read_text()
    assert "Accumulator" in api
    for raw in ("=====", "::</p>", ":func:", ":class:", ":meth:"):
        assert raw not in api, raw
