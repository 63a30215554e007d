"""Real scanner DICOM files that pydicom and nibabel ship, and small variants made from them.

* :func:`nibabel_dicom` reads nibabel's gzipped test files: ``philips_mprage``
  (Philips Enhanced MR, 176 sagittal frames of 256 x 256) and ``siemens_dwi_0``
  (a Siemens DWI mosaic, 48 tiles of 128 x 128). Their pixel data is blank.
* :func:`pydicom_series` is a folder of pydicom's DICOMDIR test data (real,
  down-sampled series, e.g. ``98892001/CT5N``: 5 CT slices of 16 x 16).
* :func:`small_enhanced_mr` keeps 8 frames of ``philips_mprage`` at 64 x 64
  (every 4th pixel, Pixel Spacing scaled to match) with an ellipsoid drawn in,
  planted patient identifiers and fresh UIDs: a real Enhanced MR object small
  enough to predict and send in a test.
"""

from __future__ import annotations

import gzip
import io
import warnings
from pathlib import Path

import highdicom as hd
import nibabel
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import blob_volume
from tests.dicom_peers import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME

NIBABEL_DICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"


def nibabel_dicom(name: str) -> Dataset:
    """A gzipped DICOM file from nibabel's test data, read with pydicom."""
    path = NIBABEL_DICOM / f"{name}.dcm.gz"
    if not path.is_file():
        pytest.skip(f"nibabel test file {path.name} not installed")
    return pydicom.dcmread(io.BytesIO(gzip.decompress(path.read_bytes())))


def pydicom_series(name: str) -> Path:
    """A folder of pydicom's DICOMDIR test data (a real, down-sampled series)."""
    path = get_testdata_file("DICOMDIR", download=False)
    if path is None:
        pytest.skip("pydicom test data not available offline")
    return Path(path).parent / name


def small_enhanced_mr(frames: int = 8, size: int = 64, seed: int = 0) -> Dataset:
    """``philips_mprage`` cut to ``frames`` frames of ``size`` x ``size`` with an image in it."""
    ds = nibabel_dicom("philips_mprage")
    step = int(ds.Rows) // size
    start = (int(ds.NumberOfFrames) - frames) // 2
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[
        start : start + frames
    ]
    for item in ds.PerFrameFunctionalGroupsSequence:
        pm = item.PixelMeasuresSequence[0]
        pm.PixelSpacing = [float(v) * step for v in pm.PixelSpacing]
        content = item.FrameContentSequence[0]
        content.InStackPositionNumber = int(content.InStackPositionNumber) - start
        content.DimensionIndexValues = [1, int(content.InStackPositionNumber)]
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = size
    img = blob_volume((size, size, frames), seed=seed)  # [X, Y, Z]
    ds.PixelData = np.ascontiguousarray(np.transpose(img, (2, 1, 0))).astype(np.uint16).tobytes()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def highdicom_volume(
    ds: Dataset, like: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """highdicom's own volume of ``ds`` as ``(data [X, Y, Z], RAS affine)``, slices in the
    direction of the affine ``like`` (highdicom may pick the other order): what a viewer
    that stacks the frames by their geometry shows."""
    vol = hd.Image.from_dataset(ds, copy=False).get_volume()  # [slice, row, col], LPS
    to_ref = np.zeros((4, 4))
    to_ref[0, 2] = to_ref[1, 1] = to_ref[2, 0] = to_ref[3, 3] = 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine @ to_ref
    data = np.transpose(vol.array, (2, 1, 0))
    if np.dot(affine[:3, 2], like[:3, 2]) < 0:
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1, data.shape[2] - 1
        affine, data = affine @ flip, data[:, :, ::-1]
    return data, affine


def two_echo_mprage() -> Dataset:
    """``philips_mprage`` relabelled as two echoes of 88 slices each (a 4D object)."""
    ds = nibabel_dicom("philips_mprage")
    per_frame = ds.PerFrameFunctionalGroupsSequence
    dim = Dataset()
    dim.DimensionIndexPointer = 0x00189082  # Effective Echo Time
    dim.FunctionalGroupPointer = 0x00189114
    dim.DimensionDescriptionLabel = "Effective Echo Time"
    ds.DimensionIndexSequence.append(dim)
    for f, frame in enumerate(per_frame):
        echo, slot = divmod(f, 88)
        same = per_frame[slot].PlanePositionSequence[0].ImagePositionPatient
        frame.PlanePositionSequence[0].ImagePositionPatient = [float(v) for v in same]
        content = frame.FrameContentSequence[0]
        content.DimensionIndexValues = [*content.DimensionIndexValues, echo + 1]
    return ds


def legacy_converted(sources: list[Dataset], modality: str = "CT") -> Dataset:
    """A Legacy Converted Enhanced CT (or MR) image highdicom makes from ``sources``,
    written and read back as a PACS would store it."""
    cls = {
        "CT": hd.legacy.LegacyConvertedEnhancedCTImage,
        "MR": hd.legacy.LegacyConvertedEnhancedMRImage,
    }[modality]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom notes attributes it could not carry over
        ds = cls(
            legacy_datasets=sources,
            series_instance_uid=hd.UID(),
            series_number=99,
            sop_instance_uid=hd.UID(),
            instance_number=1,
        )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))
