"""Enhanced multi-frame images and Siemens mosaics, on real scanner files.

nibabel ships a Philips Enhanced MR (``philips_mprage``, 176 sagittal frames)
and a Siemens DWI mosaic (``siemens_dwi_0``, 48 tiles of 128 x 128); both
have their pixel data blanked, so tests that check values write a known
pattern into a copy. pydicom ships a small real CT series (``CT5N``), which
highdicom turns into a Legacy Converted Enhanced CT.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from tests.real_dicom import (
    highdicom_volume,
    legacy_converted,
    nibabel_dicom,
    pydicom_series,
    small_enhanced_mr,
    two_echo_mprage,
)
from uqserve.prediction import predict, predict_volume
from uqserve.volumes import VolumeError, read_volume
from uqserve.volumes.dicom import read_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pattern(n: int, rows: int, cols: int) -> np.ndarray:
    """uint16 frames ``[n, rows, cols]`` where every frame, row and column differs."""
    f, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return ((f * 7 + r * 3 + c * 5) % 4000 + 1).astype(np.uint16)


def _frame_ipp(ds: Dataset, frame: int) -> np.ndarray:
    item = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0]
    return np.asarray(item.ImagePositionPatient, dtype=np.float64)


def test_philips_enhanced_mr_reads_as_one_stack(tmp_path: Path) -> None:
    ds = nibabel_dicom("philips_mprage")
    n, rows, cols = int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)
    frames = _pattern(n, rows, cols)
    ds.PixelData = frames.tobytes()
    (tmp_path / "mprage").mkdir()
    ds.save_as(tmp_path / "mprage" / "IM0001")
    series = read_series(tmp_path / "mprage")
    vol = series.volume
    assert vol.shape == (cols, rows, n) == (256, 256, 176)
    assert series.layout == "enhanced" and len(series.datasets) == 1
    assert sorted(series.frame_numbers or []) == list(range(1, n + 1))
    # Each slice holds its own frame, rescaled by that frame's Pixel Value Transformation.
    for k in (0, 1, 87, 175):
        f = (series.frame_numbers or [])[k]
        pvt = ds.PerFrameFunctionalGroupsSequence[f - 1].PixelValueTransformationSequence[0]
        expected = frames[f - 1].T * np.float32(pvt.RescaleSlope) + np.float32(pvt.RescaleIntercept)
        np.testing.assert_allclose(vol.data[:, :, k], expected, rtol=1e-6)
        # ... and lies where its Plane Position puts it.
        np.testing.assert_allclose(
            (vol.affine @ [0, 0, k, 1])[:3], (LPS_TO_RAS[:3, :3] @ _frame_ipp(ds, f)), atol=1e-3
        )
    # highdicom's own volume of the same file: the same voxels in the same places.
    ref_data, ref_affine = highdicom_volume(ds, like=vol.affine)
    np.testing.assert_allclose(vol.affine, ref_affine, atol=1e-4)
    np.testing.assert_allclose(vol.data, ref_data, rtol=1e-6)
    # read_volume takes the single file too (predict's path).
    single = tmp_path / "mprage.dcm"
    ds.save_as(single)
    np.testing.assert_array_equal(read_volume(single).data, vol.data)


def test_multi_stack_enhanced_is_refused_with_how_to_pick(tmp_path: Path) -> None:
    ds = two_echo_mprage()
    with pytest.raises(VolumeError) as err:
        read_series([ds], name="echoes")
    msg = str(err.value)
    assert msg.startswith("echoes: ") and "2 stacks of 88 slices" in msg
    assert "Effective Echo Time" in msg and "export one series per" in msg
    assert "\n" not in msg
    # A varying time index is a second stack even where no position repeats.
    ds = small_enhanced_mr()
    dim = Dataset()
    dim.DimensionIndexPointer = 0x00209128  # Temporal Position Index
    dim.DimensionDescriptionLabel = "Temporal Position Index"
    ds.DimensionIndexSequence.append(dim)
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        content = frame.FrameContentSequence[0]
        content.DimensionIndexValues = [*content.DimensionIndexValues, f % 2 + 1]
    with pytest.raises(VolumeError, match=r"about 2 stacks of 4 slices \(Temporal Position"):
        read_series([ds], name="time")


def test_enhanced_without_geometry_names_the_functional_group() -> None:
    """Issue 22 item 17: never "lacks ImagePositionPatient" for an enhanced image."""
    ds = nibabel_dicom("philips_mprage")
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    with pytest.raises(VolumeError) as err:
        read_series([ds], name="enh")
    assert "Plane Position functional group" in str(err.value)
    assert "ImagePositionPatient" not in str(err.value)
    # A multi-frame image without functional groups at all (RT Dose): says so.
    rtdose = get_testdata_file("rtdose.dcm", download=False)
    if rtdose is not None:
        with pytest.raises(VolumeError, match="without per-frame functional groups"):
            read_series([rtdose])


def test_enhanced_frames_with_invalid_geometry_are_refused() -> None:
    ds = small_enhanced_mr()
    for frame in ds.PerFrameFunctionalGroupsSequence:
        frame.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0.6, 0.8, 0]
    with pytest.raises(VolumeError, match=r"^enh: ImageOrientationPatient.*not orthogonal"):
        read_series([ds], name="enh")
    ds = small_enhanced_mr()
    for frame in ds.PerFrameFunctionalGroupsSequence:
        frame.PixelMeasuresSequence[0].PixelSpacing = [-4.0, 4.0]
    with pytest.raises(VolumeError, match=r"^enh: PixelSpacing is zero or negative"):
        read_series([ds], name="enh")
    ds = small_enhanced_mr()
    ds.PerFrameFunctionalGroupsSequence[3].PixelValueTransformationSequence[0].RescaleSlope = 0
    with pytest.raises(VolumeError, match=r"^enh: Rescale Slope is 0"):
        read_series([ds], name="enh")


def test_legacy_converted_enhanced_gives_the_series_maps(tiny_bundle: Path) -> None:
    folder = pydicom_series("98892001/CT5N")
    sources = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    converted = read_series([legacy_converted(sources)], name="legacy")
    classic = read_series(folder)
    assert converted.layout == "enhanced" and classic.layout == "single-frame"
    np.testing.assert_allclose(converted.volume.affine, classic.volume.affine, atol=1e-5)
    np.testing.assert_array_equal(converted.volume.data, classic.volume.data)
    a = predict_volume(converted.volume, tiny_bundle, seed=0)
    b = predict_volume(classic.volume, tiny_bundle, seed=0)
    for name in ("seg", "prob", "tu", "au", "eu"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_predict_reads_an_enhanced_file_or_its_folder(tmp_path: Path, tiny_bundle: Path) -> None:
    ds = small_enhanced_mr()
    (tmp_path / "mr").mkdir()
    ds.save_as(tmp_path / "mr" / "IM0001")
    ds.save_as(tmp_path / "single.dcm")
    series = read_series([ds], name="mr")
    results = predict([tmp_path / "mr", tmp_path / "single.dcm"], tmp_path / "out", tiny_bundle)
    segs = [nibabel.load(r.out_dir / "seg.nii.gz") for r in results]
    for img in segs:
        assert img.shape == (64, 64, 8)
        np.testing.assert_allclose(img.affine, series.volume.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(segs[0].dataobj), np.asarray(segs[1].dataobj))


def test_siemens_mosaic_unpacks_into_slices() -> None:
    ds = nibabel_dicom("siemens_dwi_0")
    assert (int(ds.Rows), int(ds.Columns)) == (896, 896)
    tiles = _pattern(49, 128, 128)  # 7 x 7 grid, 48 used
    grid = tiles.reshape(7, 7, 128, 128).transpose(0, 2, 1, 3).reshape(896, 896)
    ds.PixelData = grid.tobytes()
    series = read_series([ds], name="dwi")
    vol = series.volume
    assert vol.shape == (128, 128, 48) and series.layout == "mosaic"
    for k in (0, 1, 7, 47):
        tile = (series.frame_numbers or [])[k] - 1
        np.testing.assert_array_equal(vol.data[:, :, k], tiles[tile].T.astype(np.float32))
    # nibabel's own affine for the mosaic ([row, col, slice], LPS) agrees.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

        ref = dicomwrappers.MosaicWrapper(ds).affine
    swap = np.eye(4)[[1, 0, 2, 3]]
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ ref @ swap, atol=1e-4)
    assert np.allclose(vol.spacing, (1.796875, 1.796875, 3.0), atol=1e-4)


def test_mosaic_without_csa_is_refused_not_stacked() -> None:
    ds = nibabel_dicom("siemens_dwi_0")
    for tag in [t for t in ds.keys() if t.group == 0x0029]:
        del ds[tag]
    with pytest.raises(VolumeError, match="dwi: a Siemens mosaic whose CSA header cannot be read"):
        read_series([ds], name="dwi")


def test_several_multiframe_objects_in_one_series_are_refused() -> None:
    a = nibabel_dicom("siemens_dwi_0")
    b = nibabel_dicom("siemens_dwi_0")
    b.SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(VolumeError, match=r"2 images in one series.*mosaic.*own folder"):
        read_series([a, b], name="dwi")
