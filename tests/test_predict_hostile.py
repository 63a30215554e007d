"""Hostile scans, bundles and output places through predict: one line, nothing half-written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import blob_volume, write_nifti
from uqserve.bundle import BundleError, Normalization, load_bundle
from uqserve.prediction import PredictError, predict

UQSERVE = str(Path(sys.executable).parent / "uqserve")


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [UQSERVE, "predict", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def extreme(kind: str) -> npt.NDArray[np.float32]:
    v = blob_volume((24, 20, 3))
    if kind == "one +3e38":
        v[3, 4, 1] = 3e38
    elif kind == "one -3e38":
        v[3, 4, 1] = -3e38
    elif kind == "both":
        v[3, 4, 1], v[5, 5, 0] = -3e38, 3e38
    elif kind == "scan x 3e38":
        v = (v / 500 * 3e38).astype(np.float32)
    elif kind == "all -3e38 but one":
        v[:] = -3e38
        v[0, 0, 0] = 3e38
    return v


KINDS = ["one +3e38", "one -3e38", "both", "scan x 3e38", "all -3e38 but one"]


@pytest.fixture(scope="module")
def fixed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._bundles import make_tiny_bundle

    norm = Normalization(scheme="fixed", mean=100.0, std=50.0)
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "fixed", normalization=norm)


@pytest.mark.parametrize("which", ["tiny_bundle", "fixed_bundle"])
def test_extreme_finite_voxels_give_finite_maps_and_a_warning(
    request: pytest.FixtureRequest, which: str, tmp_path: Path
) -> None:
    bundle = request.getfixturevalue(which)
    scans = [write_nifti(tmp_path / f"s{i}.nii.gz", extreme(k)) for i, k in enumerate(KINDS)]
    results = predict(scans, tmp_path / "out", bundle, on_error="skip")
    assert [r.error for r in results] == [None] * len(KINDS)
    for res in results:
        assert res.report is not None and res.out_dir is not None
        assert any("e+38 in magnitude" in w for w in res.report["warnings"])
        for name in ("tu", "au", "eu", "prob"):
            data = np.asanyarray(nib.load(str(res.out_dir / f"{name}.nii.gz")).dataobj)
            assert np.all(np.isfinite(data)), (res.name, name)
        lesion = res.report["volumes"]["lesion"]
        assert math.isfinite(lesion["mean_ml"]) and math.isfinite(lesion["std_ml"])


def test_cli_extreme_scans_then_an_ordinary_one(tiny_bundle: Path, tmp_path: Path) -> None:
    a = write_nifti(tmp_path / "a.nii.gz", extreme("both"))
    b = write_nifti(tmp_path / "b.nii.gz", extreme("all -3e38 but one"))
    c = write_nifti(tmp_path / "c.nii.gz", blob_volume((24, 20, 3)))
    proc = cli(a, b, c, "-o", tmp_path / "o", "-b", tiny_bundle, "--json", "--png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no numpy overflow warnings either (preview included)
    names = [json.loads(x)["scan"]["name"] for x in proc.stdout.splitlines()]
    assert names == [a.name, b.name, c.name]


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("std", float("nan"), "std must be a finite number > 0, got nan"),
        # One case in the fast tier: each runs the CLI once more.
        pytest.param("std", float("inf"), "std must be a finite number > 0, got inf", marks=SLOW),
        pytest.param("mean", float("nan"), "mean must be a finite number, got nan", marks=SLOW),
        pytest.param("clip", [5.0, 1.0], "clip must be two finite numbers, low < high", marks=SLOW),
    ],
)
def test_bundle_with_bad_normalization_is_refused_at_load(
    tiny_bundle: Path, tmp_path: Path, field: str, value: object, match: str
) -> None:
    import shutil

    bad = Path(shutil.copytree(tiny_bundle, tmp_path / "bad"))
    man = json.loads((bad / "manifest.json").read_text())
    man["input"]["normalization"][field] = value
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match=match):
        load_bundle(bad, verify=False)
    scan = write_nifti(tmp_path / "s.nii.gz", blob_volume((24, 20, 3)))
    proc = cli(scan, "-o", tmp_path / "o", "-b", bad)
    assert proc.returncode == 1 and match in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_seed_range_is_checked_before_any_file_is_read(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(PredictError, match=r"seed must be in 0\.\.2\^63-1"):
        predict([tmp_path / "missing.nii.gz"], tmp_path / "o", tiny_bundle, seed=2**63)
    proc = cli(tmp_path / "missing.nii.gz", "-b", tiny_bundle, "--seed", str(2**63))
    assert proc.returncode == 2 and "--seed" in proc.stderr and "missing" not in proc.stderr


def test_failed_scan_leaves_no_output_folder(tiny_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.nii.gz").write_bytes(b"junk")
    proc = cli(tmp_path / "bad.nii.gz", "-o", tmp_path / "new" / "out", "-b", tiny_bundle)
    assert proc.returncode == 1
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # an existing, empty -o is the user's: it stays
    assert cli(tmp_path / "bad.nii.gz", "-o", tmp_path / "mine", "-b", tiny_bundle).returncode
    assert (tmp_path / "mine").is_dir()


def test_header_oddities_reach_report_warnings_or_are_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    img = nib.Nifti1Image(blob_volume((24, 20, 3)), None)
    img.header["pixdim"][1:4] = 0
    nib.save(img, str(tmp_path / "zero.nii.gz"))
    write_nifti(tmp_path / "scaled.nii.gz", blob_volume((24, 20, 3)) * 1e20)
    write_nifti(tmp_path / "huge.nii.gz", blob_volume((24, 20, 3)), np.diag([1e30, 1, 1, 1]))
    data = blob_volume((24, 20, 3)).astype(np.complex64) * 1j
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "cplx.nii.gz"))
    proc = cli(
        *sorted(tmp_path.glob("*.nii.gz")), "-o", tmp_path / "o", "-b", tiny_bundle, "--json"
    )
    assert proc.returncode == 1
    reports = {json.loads(x)["scan"]["name"]: json.loads(x) for x in proc.stdout.splitlines()}
    assert sorted(reports) == ["scaled.nii.gz", "zero.nii.gz"]
    assert any(
        "pixdim[1], pixdim[2], pixdim[3] = 0" in w for w in reports["zero.nii.gz"]["warnings"]
    )
    assert any("intensities up to" in w for w in reports["scaled.nii.gz"]["warnings"])
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 3
    assert "cplx.nii.gz: complex voxel data" in errors[0]
    assert "huge.nii.gz: voxel size 1e+30x1x1 mm is impossible" in errors[1]


@pytest.mark.slow  # several CLI runs against unusable output places
def test_output_places_that_cannot_work(tiny_bundle: Path, tmp_path: Path) -> None:
    scan = write_nifti(tmp_path / "scan.nii.gz", blob_volume((24, 20, 3)))
    # -o is the input file itself: refused, the scan untouched.
    before = scan.read_bytes()
    proc = cli(scan, "-o", scan, "-b", tiny_bundle)
    assert proc.returncode == 1 and "cannot create the output folder" in proc.stderr
    assert scan.read_bytes() == before
    # -o a symlink to a folder: results land in the folder, the link stays a link.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert cli(scan, "-o", tmp_path / "link", "-b", tiny_bundle).returncode == 0
    assert (tmp_path / "real" / "scan" / "report.json").is_file()
    assert (tmp_path / "link").is_symlink()
    # The scan's own result folder is a symlink: with --overwrite the link is replaced,
    # never the folder it points to.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "scan").symlink_to(tmp_path / "elsewhere")
    assert cli(scan, "-o", tmp_path / "o2", "-b", tiny_bundle, "--overwrite").returncode == 0
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "o2" / "scan" / "report.json").is_file()
    assert not (tmp_path / "o2" / "scan").is_symlink()
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["scan"]
    # A dangling symlink in the way is existing results like any other (kept without --overwrite).
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "scan").symlink_to(tmp_path / "nowhere")
    proc = cli(scan, "-o", tmp_path / "o3", "-b", tiny_bundle)
    assert proc.returncode == 1 and "results exist already" in proc.stderr
    assert (tmp_path / "o3" / "scan").is_symlink()


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs folders (root only; skipped elsewhere)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts need root")
def test_disk_full_and_read_only_output(
    tiny_bundle: Path, tmp_path: Path, mount_tmpfs: Callable[[str], Path]
) -> None:
    scan = write_nifti(tmp_path / "scan.nii.gz", blob_volume((48, 40, 6)))
    full = mount_tmpfs("size=48k")
    proc = cli(scan, "-o", full / "out", "-b", tiny_bundle)
    assert proc.returncode == 1
    assert "cannot write results (No space left on device)" in proc.stderr
    assert list(full.iterdir()) == []  # neither a temp folder nor the -o folder stays
    ro = mount_tmpfs("size=1m,ro")
    proc = cli(scan, "-o", ro / "out", "-b", tiny_bundle)
    assert proc.returncode == 1 and "Read-only file system" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2


def test_results_never_replace_the_input(tiny_bundle: Path, tmp_path: Path) -> None:
    from tests.dicom_peers import phantom, write_ct_series

    write_ct_series(tmp_path / "dcm", phantom((16, 12, 3)))
    series = sorted(p.name for p in (tmp_path / "dcm").iterdir())
    # `uqserve predict .` inside the series: named after the real folder, not "" (= -o itself).
    proc = cli(".", "-o", tmp_path / "res", "-b", tiny_bundle, cwd=tmp_path / "dcm")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "res" / "dcm" / "report.json").is_file()
    # OUT/<name> would be the input folder itself, or the folder holding the input file.
    (tmp_path / "scan").mkdir()
    write_nifti(tmp_path / "scan" / "scan.nii.gz", blob_volume((16, 12, 2)))
    for args in (("dcm", "-o", "."), ("scan/scan.nii.gz", "-o", ".")):
        proc = cli(*args, "-b", tiny_bundle, "--overwrite", cwd=tmp_path)
        assert proc.returncode == 1
        assert "the results would replace the input" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "dcm").iterdir()) == series
    assert [p.name for p in (tmp_path / "scan").iterdir()] == ["scan.nii.gz"]


def test_colour_nifti_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii"))
    proc = cli(tmp_path / "rgb.nii", "-o", tmp_path / "o", "-b", tiny_bundle)
    assert proc.returncode == 1 and "rgb.nii: colour (RGB) voxel data" in proc.stderr


@pytest.mark.parametrize("stem", ["s" * 248, "scan-" + "é" * 100 + "b" * 43])  # 248 bytes each
def test_longest_scan_names_are_written(tiny_bundle: Path, tmp_path: Path, stem: str) -> None:
    """A scan name as long as a file name allows (255 bytes with .nii.gz): temp names stay short."""
    assert len(os.fsencode(stem)) == 248
    write_nifti(tmp_path / f"{stem}.nii.gz", blob_volume((12, 10, 2)))
    proc = cli(f"{stem}.nii.gz", "-o", "out", "-b", tiny_bundle, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [stem]
    assert (tmp_path / "out" / stem / "report.json").is_file()


def test_stale_temp_folders_of_long_names(tmp_path: Path) -> None:
    """Cut temp names of dead writers: .tmp- removed; .old- kept unless its folder exists."""
    from uqserve._fs import _stem, owner_tag, remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = owner_tag().split(".")[0]
    names = ["é" * 120, "x" * 200, "y" * 200]
    tmp, old_lost, old_done = (
        tmp_path / f".{_stem(n)}.{kind}-{host}.{dead.pid}.0-abc"
        for n, kind in zip(names, ["tmp", "old", "old"], strict=True)
    )
    for folder in (tmp, old_lost, old_done, tmp_path / names[2]):
        folder.mkdir()
    assert all(len(os.fsencode(p.name)) < 200 for p in (tmp, old_lost))
    assert sorted(remove_stale(tmp_path)) == sorted([tmp, old_done])
    assert old_lost.is_dir()  # its full name is unknown: never removed, never guessed


def test_a_name_too_long_for_a_folder_names_the_scan(tmp_path: Path) -> None:
    from uqserve.volumes import OutputError
    from uqserve.volumes.io import atomic_output_dir

    with pytest.raises(OutputError, match=r"n{20}: the scan's name is 256 bytes, more than"):
        with atomic_output_dir(tmp_path / ("n" * 256)):
            pass
    assert list(tmp_path.iterdir()) == []
