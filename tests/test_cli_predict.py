"""`uqserve predict` through the real CLI (Typer's CliRunner): outputs, JSON, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import blob_volume, write_nifti
from uqserve.cli import app

MAPS = ("seg", "prob", "tu", "au", "eu")

runner = CliRunner()


def _run(*args: str | Path) -> tuple[int, str, str]:
    res = runner.invoke(app, ["predict", *map(str, args)])
    assert "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    return res.exit_code, res.stdout, res.stderr


def test_predict_table_and_files(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    code, out, err = _run(scan, "-o", tmp_path / "o", "--bundle", tiny_bundle, "--png")
    assert code == 0, err
    assert "TU" in out and "OOD" in out and "volume lesion" in out
    files = {p.name for p in (tmp_path / "o" / "scan").iterdir()}
    assert files == {"seg.nii.gz", "prob.nii.gz", "tu.nii.gz", "au.nii.gz", "eu.nii.gz",
                     "report.json", "preview.png"}  # fmt: skip


def test_json_lines_for_several_scans(tiny_bundle: Path, tmp_path: Path) -> None:
    a = write_nifti(tmp_path / "a.nii.gz", blob_volume(seed=1))
    b = write_nifti(tmp_path / "b.nii", blob_volume(seed=2))
    code, out, _ = _run(a, b, "-o", tmp_path / "o", "-b", tiny_bundle, "--json", "--seed", "5",
                        "--batch-size", "2", "--device", "cpu")  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["scan"]["name"] for r in lines] == ["a.nii.gz", "b.nii"]
    assert all(r["seed"] == 5 for r in lines)
    on_disk = json.loads((tmp_path / "o" / "a" / "report.json").read_text())
    assert on_disk["scores"] == lines[0]["scores"]


def test_batch_size_does_not_change_outputs(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    import nibabel as nib

    _run(scan, "-o", tmp_path / "b1", "-b", tiny_bundle, "--batch-size", "1", "-q")
    _run(scan, "-o", tmp_path / "b4", "-b", tiny_bundle, "--batch-size", "4", "-q")
    for name in ("seg", "prob", "tu", "au", "eu"):
        x = np.asanyarray(nib.load(str(tmp_path / "b1" / "scan" / f"{name}.nii.gz")).dataobj)
        y = np.asanyarray(nib.load(str(tmp_path / "b4" / "scan" / f"{name}.nii.gz")).dataobj)
        np.testing.assert_array_equal(x, y)


def test_compression_level_changes_bytes_not_maps(
    tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    import gzip

    import nibabel as nib

    for level in ("0", "1", "9"):
        code, out, err = _run(scan, "-o", tmp_path / level, "-b", tiny_bundle, "--json",
                              "--compression-level", level)  # fmt: skip
        assert code == 0, err
        files = json.loads(out.splitlines()[0])["outputs"]["files"]
        suffix = ".nii" if level == "0" else ".nii.gz"
        assert files == [f"{m}{suffix}" for m in MAPS] + ["report.json"]
        assert sorted(p.name for p in (tmp_path / level / "scan").iterdir()) == sorted(files)
    for name in MAPS:
        plain = (tmp_path / "0" / "scan" / f"{name}.nii").read_bytes()  # no gzip at level 0
        files = {lv: tmp_path / lv / "scan" / f"{name}.nii.gz" for lv in ("1", "9")}
        payload = {lv: gzip.decompress(f.read_bytes()) for lv, f in files.items()}
        assert payload["1"] == payload["9"] == plain  # the same NIfTI bytes at every level
        assert len(plain) > files["1"].stat().st_size
        assert files["1"].read_bytes() != files["9"].read_bytes()  # igzip vs zlib
        assert np.asanyarray(nib.load(str(files["1"])).dataobj).shape == (40, 36, 5)
    code, _, _ = _run(scan, "-o", tmp_path / "x", "-b", tiny_bundle, "--compression-level", "10")
    assert code == 2 and not (tmp_path / "x").exists()


def test_bad_scans_are_skipped(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = write_nifti(folder / "good.nii.gz", blob_volume())
    (folder / "trunc.nii.gz").write_bytes(good.read_bytes()[:400])
    write_nifti(folder / "allnan.nii.gz", np.full((6, 6, 2), np.nan, np.float32))
    write_nifti(folder / "line.nii.gz", np.ones((9,), np.float32))
    (folder / "empty.nii").write_bytes(b"")
    code, _, err = _run(folder, "-o", tmp_path / "o", "-b", tiny_bundle, "-q")
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 5  # four scans + the summary line
    assert "4 of 5 scans failed" in err
    for name in ("trunc.nii.gz", "allnan.nii.gz", "line.nii.gz", "empty.nii"):
        assert any(name in line for line in lines), (name, err)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good"]


def test_four_d_input(tiny_bundle: Path, tmp_path: Path) -> None:
    series = np.stack([blob_volume((16, 16, 2), seed=s) for s in range(3)], axis=-1)
    p = write_nifti(tmp_path / "fmri.nii.gz", series)
    code, _, err = _run(p, "-o", tmp_path / "o", "-b", tiny_bundle)
    assert code == 1 and "--volume-index 0..2" in err
    code, _, err = _run(p, "-o", tmp_path / "o", "-b", tiny_bundle, "--volume-index", "2", "-q")
    assert code == 0, err


@pytest.mark.parametrize("problem", ["not_a_bundle", "checksum", "missing"])
def test_bad_bundle(tmp_path: Path, scan: Path, make_bundle: object, problem: str) -> None:
    if problem == "not_a_bundle":
        bundle = tmp_path / "empty"
        bundle.mkdir()
        expect = "not a bundle"
    elif problem == "checksum":
        bundle = make_bundle("b")  # type: ignore[operator]
        member = bundle / "member_0.onnx"
        member.write_bytes(member.read_bytes() + b"\0")
        expect = "checksum mismatch"
    else:
        bundle = tmp_path / "nope"
        expect = "no such bundle"
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", bundle)
    assert code == 1 and expect in err and err.startswith("error:")
    assert not (tmp_path / "o").exists()


def test_output_problems(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _run(scan, "-o", blocker, "-b", tiny_bundle)
    assert code == 1 and "cannot create the output folder" in err
    assert _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle, "-q")[0] == 0
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle)
    assert code == 1 and "--overwrite" in err
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle, "--overwrite", "-q")
    assert code == 0, err


def test_unreachable_server(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle,
                        "--server", "grpc://127.0.0.1:9")  # fmt: skip
    assert code == 1 and "127.0.0.1:9" in err and err.startswith("error:")


def test_bad_options(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle, "--device", "tpu")
    assert code == 1 and "--device 'tpu'" in err
    code, _, _ = _run(scan, "-b", tiny_bundle, "--batch-size", "0")
    assert code == 2  # Typer's usage error
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle, "--precision", "fp64")
    assert code == 1 and "--precision 'fp64'" in err
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle, "--fast",
                        "--precision", "fp16")  # fmt: skip
    assert code == 1 and "contradicts --precision fp16" in err
    # reduced precision is for GPUs: refused on a CPU, nothing written
    code, _, err = _run(scan, "-o", tmp_path / "o", "-b", tiny_bundle, "--device", "cpu", "--fast")
    assert code == 1 and "precision 'tf32' needs a GPU" in err
    assert not (tmp_path / "o").exists()


def test_dicom_folder(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tests.dicom_peers import phantom, write_ct_series

    write_ct_series(tmp_path / "series1", phantom((24, 20, 3), seed=4))
    code, out, err = _run(tmp_path / "series1", "-o", tmp_path / "o", "-b", tiny_bundle, "--json")
    assert code == 0, err
    assert json.loads(out)["scan"]["shape"] == [24, 20, 3]


@pytest.mark.parametrize(
    ("keyword", "raw"),
    [("PixelSpacing", rb"abc\0.7"), ("ImageOrientationPatient", rb"0\1\0\0\0"),
     ("RescaleSlope", b"0")],
)  # fmt: skip
def test_malformed_dicom_values_are_one_line_input_errors(
    tiny_bundle: Path, tmp_path: Path, keyword: str, raw: bytes
) -> None:
    from tests.dicom_peers import phantom, set_raw_value, write_ct_series

    syn = write_ct_series(tmp_path / "s", phantom((16, 12, 3), seed=2), shuffle_names=False)
    set_raw_value(syn.files[2], keyword, raw)
    code, _, err = _run(tmp_path / "s", "-o", tmp_path / "o", "-b", tiny_bundle, "-q")
    assert code == 1 and "internal error" not in err
    (line,) = [line for line in err.splitlines() if keyword in line]
    assert line.startswith("error:") and "slice002.dcm" in line
    assert not (tmp_path / "o" / "s").exists()
