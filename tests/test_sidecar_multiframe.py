"""An enhanced multi-frame MR through the sidecar to a real Orthanc, end to end.

dcmtk's ``storescu`` sends one Enhanced MR object (nibabel's Philips file, cut
down and drawn into) to the sidecar; Orthanc receives the results; they
reference the source frames and pass ``dciodvfy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from tests.dicom_peers import PATIENT_ID, Orthanc, dciodvfy, require, sent, storescu
from tests.real_dicom import small_enhanced_mr
from tests.test_sidecar import SENDER, _sidecar, _wait_results
from uqserve.prediction import predict_volume
from uqserve.sidecar import series_key
from uqserve.volumes.dicom import read_series

pytestmark = pytest.mark.dicom


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    require("Orthanc", "storescu", "dciodvfy")
    with Orthanc(tmp_path / "orthanc") as peer:
        yield peer


def test_enhanced_mr_end_to_end(tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc) -> None:
    source = small_enhanced_mr(seed=4)
    path = tmp_path / "enhanced.dcm"
    source.save_as(path)
    with _sidecar(tmp_path, tiny_bundle, orthanc) as sc:
        proc = storescu([path], sc.port, called_ae="UQSIDECAR", calling_ae=SENDER)
        assert sent(proc), proc.stderr
        got = _wait_results(orthanc, str(source.SeriesInstanceUID), 5)
    assert set(got) == {"SEGMENTATION", "TU", "AU", "EU", "SR"}
    series = read_series([path])
    pred = predict_volume(series.volume, str(tiny_bundle), seed=7)
    uid = str(source.SOPInstanceUID)
    seg = hd.seg.Segmentation.from_dataset(got["SEGMENTATION"])
    labels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=uid,
        source_frame_numbers=series.frame_numbers,
        combine_segments=True,
        skip_overlap_checks=True,
    )  # [Z, rows, cols] in slice order
    np.testing.assert_array_equal(np.transpose(labels, (2, 1, 0)), pred.seg)
    assert pred.seg.any() and not pred.seg.all()
    for kind in ("TU", "AU", "EU"):
        refs = {
            int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for f in got[kind].PerFrameFunctionalGroupsSequence
        }
        assert refs == set(range(1, int(source.NumberOfFrames) + 1)), kind
    for label, ds in got.items():
        assert ds.StudyInstanceUID == source.StudyInstanceUID, label
        assert ds.PatientID == PATIENT_ID, label
        out = tmp_path / f"{label}.dcm"
        ds.save_as(out)
        errors, _ = dciodvfy(out)
        assert not errors, f"{label}: {errors}"
    record = sc.spool.done_record(series_key(str(source.SeriesInstanceUID)))
    assert record is not None and record["status"] == "delivered"
    assert record["slices"] == int(source.NumberOfFrames)
