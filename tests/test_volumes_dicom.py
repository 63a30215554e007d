"""read_series: geometry, ordering, rescale and the series it must refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.dicom_peers import (
    PATIENT_ID,
    PATIENT_NAME,
    phantom,
    set_raw_value,
    write_ct_series,
)
from uqserve.volumes import VolumeError
from uqserve.volumes.dicom import DicomSeries, read_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _testdata(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return str(path)


def _check_geometry(series: DicomSeries) -> None:
    """Every voxel index maps to where the DICOM tags of its own slice put it."""
    aff = series.volume.affine
    for k, ds in enumerate(series.datasets):
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for i, j in [(0, 0), (5, 0), (0, 7), (13, 11)]:
            lps = ipp + i * dc * iop[:3] + j * dr * iop[3:]
            expected = LPS_TO_RAS[:3, :3] @ lps
            np.testing.assert_allclose((aff @ [i, j, k, 1])[:3], expected, atol=1e-4)


@pytest.mark.parametrize(
    "orientation",
    [
        (1, 0, 0, 0, 1, 0),  # axial
        (1, 0, 0, 0, 0, -1),  # coronal
        (0.0, 0.8660254, -0.5, 0.0, 0.5, 0.8660254),  # oblique
    ],
)
def test_round_trip_geometry_and_values(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    hu = phantom((40, 32, 6), seed=3)
    syn = write_ct_series(tmp_path, hu, orientation=orientation, spacing=(0.8, 0.7, 2.5))
    series = read_series(tmp_path)
    vol = series.volume
    assert vol.data.shape == (40, 32, 6)  # [X=columns, Y=rows, Z=slices]
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, syn.hu)  # rescale applied, slice order restored
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ syn.affine_lps, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.7, 2.5), atol=1e-6)
    _check_geometry(series)
    assert [int(ds.InstanceNumber) for ds in series.datasets] == list(range(1, 7))
    assert series.modality == "CT"
    # Messages and metadata never carry identifiers.
    assert PATIENT_NAME not in repr(vol.meta) and PATIENT_ID not in repr(vol.meta)
    assert syn.series_uid not in repr(vol.meta)


def test_reversed_normal_and_file_list(tmp_path: Path) -> None:
    """Slices stored head-to-feet (negative step) still sort along the normal."""
    hu = phantom((16, 16, 5), seed=1)
    syn = write_ct_series(tmp_path, hu, orientation=(1, 0, 0, 0, -1, 0))  # normal points to -z
    files = list(reversed(syn.files))
    series = read_series(files)
    np.testing.assert_array_equal(series.volume.data, syn.hu)
    _check_geometry(series)
    assert np.linalg.det(series.volume.affine[:3, :3]) != 0
    # Datasets as input give the same volume.
    same = read_series([pydicom.dcmread(f) for f in syn.files], name="mem")
    np.testing.assert_array_equal(same.volume.data, series.volume.data)
    assert same.volume.source == "mem"


def test_non_dicom_files_are_skipped(tmp_path: Path) -> None:
    write_ct_series(tmp_path, phantom((16, 16, 3)))
    (tmp_path / "README.txt").write_text("not dicom")
    assert read_series(tmp_path).volume.shape == (16, 16, 3)


def test_missing_slice_is_incomplete(tmp_path: Path) -> None:
    syn = write_ct_series(tmp_path, phantom((16, 16, 6)), shuffle_names=False)
    syn.files[3].unlink()
    with pytest.raises(VolumeError, match=r"incomplete.*1 slice\(s\) missing"):
        read_series(tmp_path)


def test_mixed_series_rejected(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "a", phantom((16, 16, 3)))
    write_ct_series(tmp_path / "b", phantom((16, 16, 3)))
    with pytest.raises(VolumeError, match="2 different series"):
        read_series(tmp_path)


def test_inconsistent_geometry_rejected(tmp_path: Path) -> None:
    syn = write_ct_series(tmp_path, phantom((16, 16, 4)), shuffle_names=False)
    ds = pydicom.dcmread(syn.files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    ds.save_as(syn.files[2])
    with pytest.raises(VolumeError, match="Orientation"):
        read_series(tmp_path)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(syn.files[2])
    with pytest.raises(VolumeError, match="Pixel Spacing"):
        read_series(tmp_path)


@pytest.mark.parametrize(
    ("keyword", "raw", "said"),
    [
        # orientation: unit vectors 30 degrees apart, and 84 degrees apart
        ("ImageOrientationPatient", rb"1\0\0\0.8660254\0.5\0", "not orthogonal"),
        ("ImageOrientationPatient", rb"0\1\0\0.1\0.1\0.98995", "not orthogonal"),
        ("PixelSpacing", rb"-0.7\0.8", "PixelSpacing is zero or negative"),
        ("PixelSpacing", rb"0.7\0", "PixelSpacing is zero or negative"),
        ("RescaleSlope", b"0.0", "RescaleSlope is 0"),
    ],
)
def test_invalid_geometry_is_refused_with_its_reason(
    tmp_path: Path, keyword: str, raw: bytes, said: str
) -> None:
    """Every image of the series carries the same impossible value: refused, the reason named."""
    syn = write_ct_series(tmp_path, phantom((12, 10, 3)), shuffle_names=False)
    for f in syn.files:
        set_raw_value(f, keyword, raw)
    with pytest.raises(VolumeError, match=said) as info:
        read_series(tmp_path)
    assert str(syn.files[0]) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("keyword", "raw"),
    [
        ("ImagePositionPatient", rb"-25\-20"),  # 2 values
        ("ImageOrientationPatient", rb"1\0\0\0\1"),  # 5 values
        ("ImageOrientationPatient", rb"1\0\0\0\1\0\0"),  # 7 values
        ("PixelSpacing", rb"0.7\xyz"),
        ("PixelSpacing", rb"0.7\nan"),
        ("RescaleSlope", b"one"),
        ("RescaleIntercept", b"-1024HU"),
        ("SliceThickness", b"2.5mm"),
    ],
)
def test_malformed_values_are_input_errors(tmp_path: Path, keyword: str, raw: bytes) -> None:
    """One image with a value that is not what its tag holds: a VolumeError naming file and tag."""
    syn = write_ct_series(tmp_path, phantom((12, 10, 3)), shuffle_names=False)
    set_raw_value(syn.files[1], keyword, raw)
    with pytest.raises(VolumeError, match=f"{keyword} is not") as info:
        read_series(tmp_path)
    assert str(syn.files[1]) in str(info.value)
    assert raw.decode() not in str(info.value)  # values are never quoted


def test_duplicate_positions_rejected(tmp_path: Path) -> None:
    syn = write_ct_series(tmp_path, phantom((16, 16, 4)), shuffle_names=False)
    ds = pydicom.dcmread(syn.files[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "dup.dcm")
    with pytest.raises(VolumeError, match="share one slice position"):
        read_series(tmp_path)


def test_pydicom_single_slice_ct(tmp_path: Path) -> None:
    path = _testdata("CT_small.dcm")
    series = read_series([path])
    ds = pydicom.dcmread(path)
    assert series.volume.shape == (int(ds.Columns), int(ds.Rows), 1)
    expected = ds.pixel_array.T.astype(np.float32) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    np.testing.assert_array_equal(series.volume.data[:, :, 0], expected)
    _check_geometry(series)


def test_pydicom_odd_files(tmp_path: Path) -> None:
    # Compressed (JPEG-LS lossless) pixel data decodes to the uncompressed values.
    plain = read_series([_testdata("MR_small.dcm")]).volume
    jls = read_series([_testdata("MR_small_jpeg_ls_lossless.dcm")]).volume
    np.testing.assert_array_equal(jls.data, plain.data)
    np.testing.assert_allclose(jls.affine, plain.affine)
    # Compressed data that cannot be decoded: a clear reason, not a traceback.
    ds = pydicom.dcmread(_testdata("MR_small_RLE.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds.save_as(tmp_path / "broken_rle.dcm")
    with pytest.raises(VolumeError, match=r"cannot decode pixel data.*RLE"):
        read_series([tmp_path / "broken_rle.dcm"])
    # A truncated file.
    with pytest.raises(VolumeError, match=r"MR_truncated\.dcm"):
        read_series([_testdata("MR_truncated.dcm")])
    # An object with no patient geometry (RT Dose, multi-frame) and a SEG.
    with pytest.raises(VolumeError, match=r"multi-frame|lacks"):
        read_series([_testdata("rtdose.dcm")])
    with pytest.raises(VolumeError):
        read_series([_testdata("liver_1frame.dcm")])


def test_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="empty folder"):
        read_series(tmp_path)
    with pytest.raises(VolumeError, match="no such file"):
        read_series(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM image"):
        read_series(tmp_path)
    shutil.rmtree(tmp_path)
