"""Real `uqserve predict` processes killed, signalled and racing for one output folder.

Each process is made to stop itself (SIGSTOP) at a named point through
``UQSERVE_STOP_AT`` (see ``uqserve._failpoints``); the test waits for the stop
with ``waitpid(WUNTRACED)``, then kills it, runs a rival, or resumes it. No sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import blob_volume, write_nifti

UQSERVE = str(Path(sys.executable).parent / "uqserve")


def start(*args: str | Path, stop_at: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("UQSERVE_STOP_AT", None)
    if stop_at:
        env["UQSERVE_STOP_AT"] = stop_at
    return subprocess.Popen(
        [UQSERVE, "predict", *map(str, args), "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_stopped(proc: subprocess.Popen[str]) -> None:
    """Block until ``proc`` has stopped itself at its failpoint."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"process ended instead of stopping (status {status})"


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err, out + err
    return proc.returncode, err


def run(*args: str | Path) -> tuple[int, str]:
    return finish(start(*args))


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    return write_nifti(tmp_path / "scan.nii.gz", blob_volume((24, 20, 3)))


def test_second_writer_without_overwrite_fails_and_keeps_the_first(
    tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    a = start(scan, "-o", out, "-b", tiny_bundle, "--seed", "1", stop_at="written")
    wait_stopped(a)  # A checked that out/scan is free and wrote everything into its temp
    code_b, err_b = run(scan, "-o", out, "-b", tiny_bundle, "--seed", "2")
    assert code_b == 0, err_b
    os.kill(a.pid, signal.SIGCONT)
    code_a, err_a = finish(a)
    assert code_a == 1
    assert "another run wrote results there meanwhile" in err_a and err_a.count("\n") == 2
    assert json.loads((out / "scan" / "report.json").read_text())["seed"] == 2
    assert hidden(out) == []


def test_overwrite_race_last_writer_wins_whole(
    tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    ref = tmp_path / "ref"
    assert run(scan, "-o", ref, "-b", tiny_bundle, "--seed", "1")[0] == 0
    out = tmp_path / "out"
    a = start(scan, "-o", out, "-b", tiny_bundle, "--seed", "1", "--overwrite", stop_at="written")
    wait_stopped(a)
    assert run(scan, "-o", out, "-b", tiny_bundle, "--seed", "2", "--overwrite")[0] == 0
    assert json.loads((out / "scan" / "report.json").read_text())["seed"] == 2
    os.kill(a.pid, signal.SIGCONT)
    assert finish(a)[0] == 0
    # A committed last: every file is A's, none left over from B.
    assert json.loads((out / "scan" / "report.json").read_text())["seed"] == 1
    for name in ("seg", "prob", "tu", "au", "eu"):
        got = np.asanyarray(nib.load(str(out / "scan" / f"{name}.nii.gz")).dataobj)
        want = np.asanyarray(nib.load(str(ref / "scan" / f"{name}.nii.gz")).dataobj)
        np.testing.assert_array_equal(got, want)
    assert hidden(out) == []


@pytest.mark.parametrize("point", ["read", "written", "commit"])
def test_sigkill_leftovers_are_removed_by_the_next_run(
    tiny_bundle: Path, scan: Path, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "out"
    a = start(scan, "-o", out, "-b", tiny_bundle, stop_at=point)
    wait_stopped(a)
    a.kill()  # SIGKILL: no cleanup at all, and the commit lock (if held) dies with it
    a.communicate()
    assert len([n for n in hidden(out) if n.startswith(".scan.tmp-")]) == 1
    assert not (out / "scan").exists()
    code, err = run(scan, "-o", out, "-b", tiny_bundle)
    assert code == 0, err
    assert hidden(out) == []
    assert (out / "scan" / "report.json").is_file()


@pytest.mark.slow  # two stopped and killed CLI runs
def test_next_run_of_another_scan_removes_the_leftovers_too(
    tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    a = start(scan, "-o", out, "-b", tiny_bundle, stop_at="written")
    wait_stopped(a)
    a.kill()
    a.communicate()
    assert len(hidden(out)) == 1
    other = write_nifti(tmp_path / "other.nii.gz", blob_volume((24, 20, 3), seed=4))
    assert run(other, "-o", out, "-b", tiny_bundle)[0] == 0
    assert hidden(out) == [] and sorted(p.name for p in out.iterdir()) == ["other"]


def test_stale_rules_for_foreign_owners_and_interrupted_swaps(tmp_path: Path) -> None:
    from uqserve._fs import FOREIGN_STALE_S, owner_tag, remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    host = owner_tag().split(".")[0]
    # Another machine's (or pid namespace's) temp folder: judged by age only.
    foreign = tmp_path / ".x.tmp-00000000.1.1-abc"
    foreign.mkdir()
    assert remove_stale(tmp_path) == [] and foreign.is_dir()
    old = foreign.stat().st_mtime - FOREIGN_STALE_S - 1
    os.utime(foreign, (old, old))
    assert remove_stale(tmp_path) == [foreign] and not foreign.exists()
    # A dead writer killed between the two renames of the fallback swap: results come back.
    swapped = tmp_path / f".y.old-{host}.{dead.pid}.0-abc"
    swapped.mkdir()
    (swapped / "seg.txt").write_text("old")
    assert remove_stale(tmp_path) == []
    assert (tmp_path / "y" / "seg.txt").read_text() == "old"
    # This very process's temp folder stays.
    mine = tmp_path / f".z.tmp-{owner_tag()}-abc"
    mine.mkdir()
    assert remove_stale(tmp_path) == [] and mine.is_dir()


@pytest.mark.slow  # a stopped CLI run beside a second one
def test_live_writers_temp_folder_is_not_removed(
    tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    a = start(scan, "-o", out, "-b", tiny_bundle, "--seed", "1", "--overwrite", stop_at="written")
    wait_stopped(a)
    (theirs,) = hidden(out)
    assert run(scan, "-o", out, "-b", tiny_bundle, "--seed", "2")[0] == 0
    assert hidden(out) == [theirs]  # A is alive (stopped): its work stays
    os.kill(a.pid, signal.SIGCONT)
    assert finish(a)[0] == 0
    assert json.loads((out / "scan" / "report.json").read_text())["seed"] == 1


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_clean_up_and_exit_128_plus_signal(
    tiny_bundle: Path, scan: Path, tmp_path: Path, sig: int, code: int
) -> None:
    out = tmp_path / "new" / "out"
    a = start(scan, "-o", out, "-b", tiny_bundle, stop_at="read")
    wait_stopped(a)
    assert len(hidden(out)) == 1
    os.kill(a.pid, sig)  # pending until the process runs again
    os.kill(a.pid, signal.SIGCONT)
    got, _ = finish(a)
    assert got == code
    assert not (tmp_path / "new").exists()  # the folders it created are gone with its temp


def test_outputs_follow_the_umask_alike(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for umask in (0o022, 0o077):
        before = os.umask(umask)  # inherited by the child
        try:
            assert run(scan, "-o", out / oct(umask), "-b", tiny_bundle, "--png")[0] == 0
        finally:
            os.umask(before)
        folder = out / oct(umask) / "scan"
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert "preview.png" in modes
        assert set(modes.values()) == {0o666 & ~umask}, modes
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
