"""User text that looks like rich markup prints exactly as written, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import blob_volume, write_nifti

UQSERVE = str(Path(sys.executable).parent / "uqserve")


def uqserve(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [UQSERVE, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "MarkupError" not in proc.stderr
    return proc


def test_predict_names_with_markup(tiny_bundle: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    (inp / "a[").mkdir(parents=True)
    write_nifti(inp / "a[" / "]b.nii.gz", blob_volume((16, 12, 2), seed=1))
    write_nifti(inp / "[bold]x.nii.gz", blob_volume((16, 12, 2), seed=2))
    write_nifti(inp / "scan[red].nii.gz", blob_volume((16, 12, 2), seed=3))
    (inp / "[red]bad.nii.gz").write_bytes(b"not a nifti")

    args = ["in/a[/]b.nii.gz", "in/[bold]x.nii.gz", "in/scan[red].nii.gz", "in/[red]bad.nii.gz"]
    proc = uqserve("predict", *args, "-o", "o[/]ut", "-b", tiny_bundle, cwd=tmp_path)
    assert proc.returncode == 1
    # The bad scan is reported under its own name, and the others were all processed.
    (line,) = proc.stderr.strip().splitlines()[:-1]
    assert line.startswith("error: in/[red]bad.nii.gz: not a readable NIfTI file")
    assert "1 of 4 scans failed" in proc.stderr
    for title in ("]b.nii.gz", "[bold]x.nii.gz", "scan[red].nii.gz"):
        assert f"uqserve predict · {title}" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "o[" / "]ut").iterdir()) == [
        "[bold]x",
        "]b",
        "scan[red]",
    ]
    assert "o[/]ut/scan[red]" in proc.stdout  # the "written" row


def test_predict_json_and_missing_file_with_markup(tiny_bundle: Path, tmp_path: Path) -> None:
    write_nifti(tmp_path / "[i]ok.nii.gz", blob_volume((16, 12, 2)))
    proc = uqserve(
        "predict", "[b]missing.nii.gz", "[i]ok.nii.gz", "-b", tiny_bundle, "--json", cwd=tmp_path
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: [b]missing.nii.gz: no such file")
    (report,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert report["scan"]["name"] == "[i]ok.nii.gz"


def test_other_commands_print_user_text_as_written(tiny_bundle: Path, tmp_path: Path) -> None:
    proc = uqserve("info", "[bold]no-such-bundle", cwd=tmp_path)
    assert proc.returncode != 0 and "[bold]no-such-bundle" in proc.stderr
    proc = uqserve("repo", tiny_bundle, "-o", "[red]repo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("to [red]repo/")
    proc = uqserve("serve", "--repo", "[red]nothing", cwd=tmp_path)
    assert proc.returncode != 0 and "[red]nothing" in proc.stderr
