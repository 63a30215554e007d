"""Hostile and odd inputs to the readers: refused before allocating, or read with a warning."""

from __future__ import annotations

import gzip
import resource
import warnings
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


def _patched(path: Path, **fields: float) -> Path:
    """Rewrite header fields of the NIfTI-1 file ``path`` in place, bypassing nibabel's checks."""
    raw = path.read_bytes()
    header = nib.Nifti1Header(binaryblock=raw[:348])
    for name, value in fields.items():
        header[name] = value
    path.write_bytes(header.binaryblock + raw[348:])
    return path


def test_corrupt_qform_beside_a_valid_sform_is_refused_at_read(tmp_path: Path) -> None:
    """Quaternion b^2 + c^2 = 1.13 with qform_code 2; the sform (code 1) alone is fine."""
    path = _patched(
        write_nifti(tmp_path / "q.nii", blob_volume((10, 8, 3))),
        quatern_b=0.8, quatern_c=0.7, quatern_d=0.0, qform_code=2, sform_code=1,
    )  # fmt: skip
    with pytest.raises(VolumeError, match=r"q\.nii: the header's qform .* not a valid rotation"):
        read_volume(path)
    # the same header with qform_code 0 is read (outputs then copy the sform alone)
    assert read_volume(_patched(path, qform_code=0)).shape == (10, 8, 3)


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_header_claiming_more_than_its_file_is_refused_without_allocating(
    tmp_path: Path, gz: bool
) -> None:
    """256 x 256 x 1024 float64 (512 MiB) claimed by a file of a few hundred bytes."""
    small = _patched(write_nifti(tmp_path / "s.nii", blob_volume((4, 4, 2))), datatype=64)
    header = nib.Nifti1Header(binaryblock=small.read_bytes()[:348])
    header.set_data_shape((256, 256, 1024))
    raw = header.binaryblock + small.read_bytes()[348:]
    path = tmp_path / ("big.nii.gz" if gz else "big.nii")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + (256 << 20), hard))
    try:
        with pytest.raises(VolumeError, match=r"claims 256x256x1024 voxels \(536,870,912 bytes"):
            read_volume(path)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_values_beyond_float32_and_bad_scale_factors(tmp_path: Path) -> None:
    """A float64 voxel of -1e300 (or 3e4 x scl_slope 1e38) is refused without a numpy warning."""
    data = blob_volume((6, 5, 2)).astype(np.float64)
    data[2, 3, 1] = -1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw RuntimeWarning would fail here
        with pytest.raises(VolumeError, match=r"values up to 1e\+300 .* do not fit in float32"):
            read_volume(write_nifti(tmp_path / "f64.nii", data))
        big = np.full((6, 5, 2), 30000, np.int16)
        scaled = write_nifti(tmp_path / "scaled.nii", big, slope=1e38)  # up to 3e42
        with pytest.raises(VolumeError, match="do not fit in float32"):
            read_volume(scaled)
    ones = write_nifti(tmp_path / "s.nii", np.ones((6, 5, 2), np.int16), slope=2.0, inter=5.0)
    with pytest.raises(VolumeError, match=r"s\.nii: the header's scl_slope is infinite"):
        read_volume(_patched(ones, scl_slope=-np.inf))
    vol = read_volume(_patched(ones, scl_slope=np.nan))  # nibabel's "unset": no scaling...
    assert np.all(vol.data == 1)
    assert any("scl_inter 5 is ignored" in w for w in vol.meta["warnings"])  # ...said aloud
