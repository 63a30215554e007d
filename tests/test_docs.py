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
