"""User text that looks like rich markup prints exactly as written, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run the real CLI with stdout and stderr on a pseudo-terminal (progress bars drawn)."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"}
    proc = subprocess.Popen([UQSERVE, *args], cwd=cwd, env=env, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_control_characters_in_names_are_escaped_everywhere(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Escape sequences in file names (OSC retitles the terminal, CSI clears it, a newline
    forges a line, C1 CSI) reach the table, the errors and the progress bar escaped."""
    osc, csi, c1 = "\x1b]2;owned\x07", "\x1b[2J", "\x9b31m"
    inp = tmp_path / "in"
    inp.mkdir()
    write_nifti(inp / f"a{osc}b.nii.gz", blob_volume((16, 12, 2), seed=1))
    (inp / f"bad{csi}\nx{c1}.nii.gz").write_bytes(b"not a nifti")
    code, text = _on_a_terminal(["predict", "in", "-o", "o", "-b", str(tiny_bundle)], tmp_path)
    assert code == 1, text
    for raw in (osc, csi, c1, "\x07", "\x9b"):
        assert raw not in text
    assert "uqserve predict · a\\x1b]2;owned\\x07b" in text  # the table's title
    assert "o/a\\x1b]2;owned\\x07b" in text  # the "written" row
    assert "in/bad\\x1b[2J\\x0ax\\x9b31m.nii.gz: not a readable NIfTI" in text  # the error
    assert (tmp_path / "o" / f"a{osc}b").is_dir()  # the folder keeps the real name


def test_progress_bars_escape_task_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from uqserve.cli import _common

    buf = io.StringIO()
    terminal = _common.SafeConsole(file=buf, force_terminal=True, width=120)
    monkeypatch.setattr(_common, "err_console", terminal)
    with _common.ProgressBars() as bars:
        bars(" scan\x1b]2;owned\x07\u202e.nii.gz", 1, 2)
    assert "\x1b]2" not in buf.getvalue() and "\u202e" not in buf.getvalue()
    assert "scan\\x1b]2;owned\\x07\\u202e.nii.gz" in buf.getvalue()


def test_help_reads_well_at_80_columns() -> None:
    # No `<bool>` beside flags, no 2^63-1 spelled out, and each command's summary in the
    # command list is its docstring's whole first paragraph (not cut mid-`code`).
    import typer.main
    from typer.testing import CliRunner

    from uqserve.cli import app
    from uqserve.cli._app import summary

    runner = CliRunner()
    group = typer.main.get_command(app)
    names = sorted(group.commands)  # type: ignore[attr-defined]
    assert {"predict", "export", "sidecar", "train"} <= set(names)
    for args in ([], *([name] for name in names)):
        out = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80"}).output
        assert "<bool>" not in out and "922337203685477" not in out, (args, out)
        assert max(len(line) for line in out.splitlines()) <= 80, (args, out)
    for name in names:
        command = group.commands[name]  # type: ignore[attr-defined]
        assert command.short_help == summary(command.callback.__doc__)
        assert command.short_help.count("`") % 2 == 0, command.short_help
        assert "\n" not in command.short_help and not command.short_help.endswith("...")
