"""DICOM results for an enhanced multi-frame source and for a Siemens mosaic.

The sources are real scanner files (nibabel's Philips Enhanced MR and Siemens
mosaic, cut down and drawn into); results must reference the source frames,
sit where the source slices are, and pass ``dciodvfy``.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from tests.conftest import blob_volume
from tests.dicom_peers import dciodvfy, require
from tests.real_dicom import highdicom_volume, nibabel_dicom, small_enhanced_mr
from uqserve.errors import UsageError
from uqserve.prediction import Prediction, predict_volume
from uqserve.sidecar.outputs import SourceFrames, build_outputs, write_datasets
from uqserve.volumes.dicom import DicomSeries, read_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _outputs(series: DicomSeries, bundle: Path) -> tuple[Prediction, dict[str, Dataset]]:
    pred = predict_volume(series.volume, bundle, seed=0)
    out = build_outputs(
        series.datasets,
        seg=pred.seg,
        maps={"tu": pred.tu, "au": pred.au, "eu": pred.eu},
        prob=pred.prob,
        classes=["background", "lesion"],
        key="test",
        report=dict(pred.report),
        frames=SourceFrames.of(series),
    )
    return pred, {str(getattr(ds, "ContentLabel", ds.Modality)): ds for ds in out}


def _valid(outputs: dict[str, Dataset], folder: Path) -> None:
    require("dciodvfy")
    for path in write_datasets(list(outputs.values()), folder):
        errors, _ = dciodvfy(path)
        assert not errors, f"{path.name}: {errors}"


def _positions(ds: Dataset) -> np.ndarray:
    frames = ds.PerFrameFunctionalGroupsSequence
    return np.asarray(
        [f.PlanePositionSequence[0].ImagePositionPatient for f in frames], dtype=np.float64
    )


def test_enhanced_source_results_reference_its_frames(tmp_path: Path, tiny_bundle: Path) -> None:
    source = small_enhanced_mr()
    series = read_series([source], name="enhanced")
    pred, got = _outputs(series, tiny_bundle)
    assert set(got) == {"SEGMENTATION", "TU", "AU", "EU", "SR"}
    uid = str(source.SOPInstanceUID)
    numbers = series.frame_numbers or []
    # The SEG read back by source frame equals the prediction slice by slice.
    seg = hd.seg.Segmentation.from_dataset(got["SEGMENTATION"])
    labels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=uid,
        source_frame_numbers=numbers,
        combine_segments=True,
        skip_overlap_checks=True,
    )  # [Z, rows, cols] in slice order
    np.testing.assert_array_equal(np.transpose(labels, (2, 1, 0)), pred.seg)
    assert pred.seg.any() and not pred.seg.all()
    src_positions = np.asarray(
        [
            f.PlanePositionSequence[0].ImagePositionPatient
            for f in source.PerFrameFunctionalGroupsSequence
        ],
        dtype=np.float64,
    )
    slice_of = {f: k for k, f in enumerate(numbers)}
    for kind in ("TU", "AU", "EU"):
        pm = got[kind]
        assert int(pm.NumberOfFrames) == int(source.NumberOfFrames)
        values = pm.pixel_array  # [F, rows, cols]
        # Each frame of the map names its source frame, lies where it lies, holds its slice.
        seen = set()
        for i, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
            ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == uid
            f = int(ref.ReferencedFrameNumber)
            seen.add(f)
            np.testing.assert_allclose(_positions(pm)[i], src_positions[f - 1], atol=1e-4)
            np.testing.assert_allclose(
                values[i].T, getattr(pred, kind.lower())[:, :, slice_of[f]], rtol=1e-6
            )
        assert seen == set(numbers)
    evidence = got["SR"].CurrentRequestedProcedureEvidenceSequence[0]
    refs = [
        str(i.ReferencedSOPInstanceUID)
        for s in evidence.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    ]
    assert uid in refs
    _valid(got, tmp_path / "out")


def _drawn_mosaic() -> Dataset:
    ds = nibabel_dicom("siemens_dwi_0")
    img = blob_volume((128, 128, 49), seed=1).astype(np.uint16)  # [X, Y, tile]
    tiles = np.transpose(img, (2, 1, 0))  # [tile, rows, cols]
    ds.PixelData = tiles.reshape(7, 7, 128, 128).transpose(0, 2, 1, 3).reshape(896, 896).tobytes()
    return ds


def test_mosaic_results_carry_their_own_slice_positions(tmp_path: Path, tiny_bundle: Path) -> None:
    source = _drawn_mosaic()
    series = read_series([source], name="mosaic")
    pred, got = _outputs(series, tiny_bundle)
    affine = series.volume.affine
    expected = np.asarray(
        [(LPS_TO_RAS @ affine @ [0, 0, k, 1])[:3] for k in range(series.volume.shape[2])]
    )
    for kind in ("SEGMENTATION", "TU", "AU", "EU"):
        ds = got[kind]
        assert (int(ds.Rows), int(ds.Columns)) == (128, 128)
        got_positions = _positions(ds)  # highdicom orders frames its own way
        order = np.argsort(got_positions @ (expected[-1] - expected[0]))
        np.testing.assert_allclose(got_positions[order], expected, atol=1e-3)
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    # A viewer that builds a volume from the map's own geometry gets ours back.
    data, viewer_affine = highdicom_volume(got["TU"], like=affine)
    np.testing.assert_allclose(viewer_affine, affine, atol=1e-3)
    np.testing.assert_allclose(data, pred.tu, rtol=1e-6)
    _valid(got, tmp_path / "out")


def test_enhanced_frames_must_all_be_used(tiny_bundle: Path) -> None:
    series = read_series([small_enhanced_mr()], name="enhanced")
    frames = SourceFrames.of(series)
    broken = SourceFrames("enhanced", frames.frame_numbers[:-1], frames.affine, (64, 64, 7))
    seg = np.zeros((64, 64, 7), np.uint8)
    maps = {k: np.zeros((64, 64, 7), np.float32) for k in ("tu", "au", "eu")}
    with pytest.raises(UsageError, match="each of the source's 8 frames once"):
        build_outputs(
            series.datasets, seg=seg, maps=maps, classes=["bg", "fg"], key="k", frames=broken
        )
