"""docs/guides/dicom.md, "What DICOM uqserve reads", checked against the reader.

Every row of its three tables is exercised on a real file that pydicom or
nibabel ships (or one made from them): each storage class and transfer syntax
listed is read, and each refusal is produced and its message matches the
documented one (``…`` stands for the variable parts: file names, counts).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from tests.real_dicom import (
    legacy_converted,
    nibabel_dicom,
    pydicom_series,
    small_enhanced_mr,
    two_echo_mprage,
)
from uqserve.volumes import VolumeError
from uqserve.volumes.dicom import DicomSeries, read_series

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "dicom.md"


def _table(heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, cells stripped of backticks."""
    text = PAGE.read_text()
    section = text[text.index(heading) :]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not set(line) <= set("|- "):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows[1:]  # without the header row


def _testfile(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return str(path)


def _ct5n() -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(pydicom_series("98892001/CT5N").iterdir())]


# Storage class -> (how to get a real example, the layout the reader reports).
EXAMPLES: dict[str, Callable[[], list[Dataset]]] = {
    "CT Image Storage": _ct5n,
    "MR Image Storage": lambda: [pydicom.dcmread(_testfile("MR_small.dcm"))],
    "MR Image Storage, Siemens mosaic": lambda: [nibabel_dicom("siemens_dwi_0")],
    "Enhanced MR Image Storage": lambda: [small_enhanced_mr()],
    "Legacy Converted Enhanced CT Image Storage": lambda: [legacy_converted(_ct5n())],
    "Legacy Converted Enhanced MR Image Storage": lambda: [
        legacy_converted([pydicom.dcmread(_testfile("MR_small.dcm"))], "MR")
    ],
}


def test_storage_classes_table() -> None:
    rows = _table("## Storage classes")
    documented = {r[0]: r for r in rows}
    assert set(documented) >= set(EXAMPLES), set(EXAMPLES) - set(documented)
    for name, row in documented.items():
        uid, layout = row[1], row[2]
        if name not in EXAMPLES:  # read by the same path as a tested row: say which
            assert "same reader as" in row[3], name
            continue
        datasets = EXAMPLES[name]()
        assert str(datasets[0].SOPClassUID) == uid, name
        series: DicomSeries = read_series(datasets, name=name)
        assert series.layout == layout, name
        assert series.volume.data.size > 0


def _reencoded(name: str, syntax: str) -> Dataset:
    ds = pydicom.dcmread(_testfile(name))
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_transfer_syntaxes_table() -> None:
    plain = read_series([_testfile("MR_small.dcm")]).volume.data
    rows = _table("## Transfer syntaxes")
    assert len(rows) >= 7
    for name, uid, example, *_ in rows:
        if example.startswith("MR_small.dcm re-encoded"):
            ds = _reencoded("MR_small.dcm", uid)
        else:
            ds = pydicom.dcmread(_testfile(example))
        assert str(ds.file_meta.TransferSyntaxUID) == uid, name
        np.testing.assert_array_equal(read_series([ds], name=name).volume.data, plain)


def _without_plane_position() -> list[Dataset]:
    ds = small_enhanced_mr()
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    return [ds]


def _without_csa() -> list[Dataset]:
    ds = nibabel_dicom("siemens_dwi_0")
    for tag in [t for t in ds.keys() if t.group == 0x0029]:
        del ds[tag]
    return [ds]


def _two_mosaics() -> list[Dataset]:
    a, b = nibabel_dicom("siemens_dwi_0"), nibabel_dicom("siemens_dwi_0")
    b.SOPInstanceUID = pydicom.uid.generate_uid()
    return [a, b]


def _missing_slice() -> list[Dataset]:
    ds = _ct5n()
    return ds[:2] + ds[3:]


def _duplicate_slice() -> list[Dataset]:
    ds = _ct5n()
    extra = pydicom.dcmread(sorted(pydicom_series("98892001/CT5N").iterdir())[0])
    extra.SOPInstanceUID = pydicom.uid.generate_uid()
    return [*ds, extra]


def _two_series() -> list[Dataset]:
    return [pydicom.dcmread(_testfile("CT_small.dcm")), pydicom.dcmread(_testfile("MR_small.dcm"))]


def _broken_rle() -> list[Dataset]:
    ds = pydicom.dcmread(_testfile("MR_small_RLE.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    return [ds]


REFUSALS: dict[str, Callable[[], list[Dataset]]] = {
    "files of several series": _two_series,
    "a slice missing, or uneven spacing": _missing_slice,
    "two images at one position": _duplicate_slice,
    "no patient geometry (CR, secondary capture)": lambda: [
        pydicom.dcmread(sorted(pydicom_series("77654033/CR1").iterdir())[0])
    ],
    "multi-frame with several stacks (echoes, b-values, time)": lambda: [two_echo_mprage()],
    "enhanced frame without a geometry functional group": _without_plane_position,
    "multi-frame without functional groups (RT Dose, old multi-frame)": lambda: [
        pydicom.dcmread(_testfile("rtdose.dcm"))
    ],
    "mosaic without a readable CSA header": _without_csa,
    "several mosaics or multi-frame images in one series": _two_mosaics,
    "compressed pixel data that cannot be decoded": _broken_rle,
}


def test_refusals_table() -> None:
    rows = _table("## Refusals")
    documented = {r[0]: r[1] for r in rows}
    assert set(documented) == set(REFUSALS)
    for situation, message in documented.items():
        pattern = ".*".join(re.escape(part) for part in message.split("…"))
        with pytest.raises(VolumeError) as err:
            read_series(REFUSALS[situation](), name="SCAN")
        assert re.fullmatch(pattern, str(err.value)), (situation, str(err.value))
