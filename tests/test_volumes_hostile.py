"""Hostile and odd inputs to the readers: refused before allocating, or read with a warning."""

from __future__ import annotations

import gzip
import resource
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import SCAN_AFFINE, blob_volume, write_nifti
from tests.dicom_peers import phantom, write_ct_series
from uqserve.volumes import VolumeError, read_volume
from uqserve.volumes.base import MAX_VOXELS_ENV, InputTooLargeError
from uqserve.volumes.dicom import read_series


def _one_file_series(tmp_path: Path) -> Path:
    write_ct_series(tmp_path / "series", phantom((16, 12, 1)))
    (path,) = (tmp_path / "series").iterdir()
    return path


def test_dicom_header_claiming_65535_squared_is_refused_without_allocating(
    tmp_path: Path,
) -> None:
    path = _one_file_series(tmp_path)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535  # 8 GiB of float32 for a file of a few hundred bytes
    ds.save_as(path)
    # Over the default limit: refused as too large before anything is decoded.
    with pytest.raises(InputTooLargeError, match=r"65535x65535x1 = .* limit of 268,435,456"):
        read_series(tmp_path / "series")
    # With the limit raised, the pixel data present is checked before allocating: under a
    # cap of 2 GiB more address space, allocating 16 GiB first would die with MemoryError.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + (2 << 30), hard))
    try:
        with pytest.raises(VolumeError, match=r"65535x65535 pixels .* holds 384 bytes"):
            read_series(tmp_path / "series", max_voxels=1 << 33)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status")


def test_voxel_limit_parameter_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = write_nifti(tmp_path / "scan.nii.gz", blob_volume((10, 8, 3)))
    with pytest.raises(InputTooLargeError, match=r"10x8x3 = 240 voxels .* limit of 239"):
        read_volume(scan, max_voxels=239)
    assert read_volume(scan, max_voxels=240).shape == (10, 8, 3)
    monkeypatch.setenv(MAX_VOXELS_ENV, "100")
    with pytest.raises(InputTooLargeError, match=MAX_VOXELS_ENV):
        read_volume(scan)
    write_ct_series(tmp_path / "series", phantom((16, 12, 2)))
    with pytest.raises(InputTooLargeError):
        read_volume(tmp_path / "series")
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(VolumeError, match="not a whole number"):
        read_volume(scan)
    assert issubclass(InputTooLargeError, VolumeError)  # permanent: never retried


def test_complex_nifti_is_refused(tmp_path: Path) -> None:
    data = blob_volume((8, 8, 2)).astype(np.complex64) * (1 + 1j)
    path = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(data, SCAN_AFFINE), str(path))
    with pytest.raises(VolumeError, match=r"c\.nii\.gz: complex voxel data .* magnitude"):
        read_volume(path)


def test_zero_pixdim_is_read_as_1mm_with_a_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    img = nib.Nifti1Image(blob_volume((8, 8, 2)), None)
    img.header["pixdim"][1:4] = 0
    path = tmp_path / "z.nii"
    nib.save(img, str(path))
    vol = read_volume(path)
    assert vol.spacing == (1.0, 1.0, 1.0)
    assert any("pixdim[1], pixdim[2], pixdim[3] = 0" in w for w in vol.meta["warnings"])
    assert capfd.readouterr().err == ""  # nibabel's own complaint is not printed
    ok = read_volume(write_nifti(tmp_path / "ok.nii", blob_volume((8, 8, 2))))
    assert ok.meta["warnings"] == []


@pytest.mark.parametrize(
    ("diag", "match"),
    [((1e30, 1, 1), "impossible"), ((1e-9, 1, 1), "impossible"), ((500, 1, 1), "unusual")],
)
def test_voxel_sizes(tmp_path: Path, diag: tuple[float, ...], match: str) -> None:
    path = write_nifti(tmp_path / "s.nii", blob_volume((8, 8, 2)), np.diag([*diag, 1.0]))
    if match == "impossible":
        with pytest.raises(VolumeError, match=r"s\.nii: voxel size .* impossible"):
            read_volume(path)
    else:
        assert any("unusual voxel size 500x1x1" in w for w in read_volume(path).meta["warnings"])


def test_dicom_zero_pixel_spacing_is_refused(tmp_path: Path) -> None:
    path = _one_file_series(tmp_path)
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0, 0]
    ds.save_as(path)
    with pytest.raises(VolumeError, match="PixelSpacing is zero or negative"):
        read_series(tmp_path / "series")


def test_huge_intensities_warn(tmp_path: Path) -> None:
    vol = read_volume(write_nifti(tmp_path / "s.nii", blob_volume((8, 8, 2)) * 1e20))
    assert any("intensities up to 4" in w and "e+22" in w for w in vol.meta["warnings"])


def test_truncated_gzip_and_directory_named_like_a_scan(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", blob_volume((20, 20, 4)))
    raw = gzip.decompress(good.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw)[:-200])
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz: cannot read the voxel data"):
        read_volume(cut)
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(VolumeError, match=r"dir\.nii\.gz: empty folder"):
        read_volume(tmp_path / "dir.nii.gz")


def test_dicom_damaged_geometry_and_overflowing_rescale(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    nan_pos = write_ct_series(tmp_path / "nan", phantom((16, 12, 3)))
    for f in nan_pos.files:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [float("nan"), 0.0, 0.0]
        ds.save_as(f)
    with pytest.raises(VolumeError, match=r"ImagePositionPatient is not 3 numbers"):
        read_series(tmp_path / "nan")
    huge = write_ct_series(tmp_path / "huge", phantom((16, 12, 3)))
    for f in huge.files:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = "1e38"
        ds.save_as(f)
    capfd.readouterr()
    with pytest.raises(VolumeError, match="NaN or infinite"):
        read_series(tmp_path / "huge")
    assert "overflow" not in capfd.readouterr().err  # no numpy warning on stderr
