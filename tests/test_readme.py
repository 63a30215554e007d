"""README.md: its Python example runs, its commands exist, its links and picture are real."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()


def test_readme_is_short() -> None:
    assert len(TEXT.splitlines()) <= 200, "README.md is the landing page: move details to docs/"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The five-line example, on the shipped example scan saved as scan.nii.gz."""
    [code] = re.findall(r"^## In five lines of Python\n\n```python\n(.*?)```", TEXT, re.S | re.M)
    assert len(code.strip().splitlines()) <= 5
    shutil.copy(ROOT / "examples" / "example.nii.gz", tmp_path / "scan.nii.gz")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    assert "'flag': False" in printed and "'mean_ml'" in printed  # the OOD verdict, a volume
    assert (tmp_path / "out" / "scan" / "report.json").is_file()  # validated by conftest


@pytest.mark.parametrize("target", re.findall(r"^\$ make (\w+)", TEXT, re.M))
def test_readme_commands_are_make_targets(target: str) -> None:
    """`make -n` resolves the target (dry run: nothing is installed or run)."""
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(
        ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_names_the_two_commands() -> None:
    assert re.findall(r"^\$ make (\w+)", TEXT, re.M) == ["demo", "test"]


def test_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, "README lost its links into the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_picture_is_a_predict_preview() -> None:
    """The picture is a preview.png of `uqserve predict --png`: 5 panels, 3 slices."""
    [path] = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", TEXT)
    with Image.open(ROOT / path) as img:
        assert img.format == "PNG"
        width, height = img.size
    from uqserve.prediction.preview import PANEL

    pad = 6
    assert width == pad + 5 * (PANEL + pad)  # image, overlay, TU, AU, EU
    assert height > 3 * PANEL // 2
