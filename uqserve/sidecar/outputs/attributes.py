"""What outputs take from the source (patient, study, frame of reference), made deterministic."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy.typing as npt
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM, validate_value

from uqserve._version import __version__
from uqserve.errors import UsageError
from uqserve.sidecar._source_frames import SourceFrames
from uqserve.sidecar.outputs.common import (
    _SERIES_OFFSET,
    OutputOptions,
)
from uqserve.sidecar.outputs.uids import _uid, derived_uid

# Attributes highdicom copies from the source and converts strictly (a bad
# value raises); all are Type 2, so an empty value is valid.
COPIED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _valid(keyword: str, value: Any) -> bool:
    if value is None or value == "":
        return True
    if isinstance(value, MultiValue):
        return False
    vr = dictionary_VR(keyword)
    try:
        validate_value(vr, value, pydicom_config.RAISE)
        if vr == "DA":
            DA(value)
        elif vr == "TM":
            TM(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return keyword != "PatientSex" or str(value) in ("M", "F", "O")


def sanitize_sources(source: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """Copies of ``source`` whose invalid or missing copied attributes are empty.

    Returns ``(datasets, omitted)``: ``omitted`` names (keywords only, never
    values) the attributes that held an invalid value in some image. The
    copies share elements with ``source`` (no pixel data is copied); the
    originals are not changed.
    """
    omitted: set[str] = set()
    out = []
    for ds in source:
        new = Dataset()
        for elem_tag in ds.keys():
            new[elem_tag] = ds.get_item(elem_tag)
        if hasattr(ds, "file_meta"):
            new.file_meta = ds.file_meta
        for keyword in COPIED_ATTRIBUTES:
            tag = tag_for_keyword(keyword)
            assert tag is not None
            present = tag in ds
            try:
                value = ds[tag].value if present else None
            except (ValueError, TypeError, OverflowError):
                value = object()  # undecodable counts as invalid
            if present and _valid(keyword, value):
                continue
            if present:
                omitted.add(keyword)
            new[tag] = DataElement(tag, dictionary_VR(keyword), "")
        out.append(new)
    return out, sorted(omitted)


_DATE_TIME_PAIRS = (
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("StudyDate", "StudyTime"),
)


def _source_datetime(source: Sequence[Dataset]) -> tuple[str, str]:
    """(date, time) of the source series, the first valid of series, acquisition, study.

    Falls back to 19700101 000000: outputs must not depend on when they were made.
    """
    for date_kw, time_kw in _DATE_TIME_PAIRS:
        date = str(getattr(source[0], date_kw, "") or "")
        time_ = str(getattr(source[0], time_kw, "") or "")
        if re.fullmatch(r"\d{8}", date) and _valid(date_kw, date):
            return date, time_.split(".")[0] if _valid(time_kw, time_) and time_ else "000000"
    return "19700101", "000000"


def make_deterministic(ds: Dataset, source: Sequence[Dataset], key: str) -> Dataset:
    """Replace what highdicom makes up per call: creation times and organisation UIDs.

    Dates and times come from the source series (:func:`_source_datetime`);
    every DimensionOrganizationUID is derived from the output's own UID.
    Rebuilding an output from the same series then gives the same bytes.
    """
    date, time_ = _source_datetime(source)
    for kw in ("ContentDate", "InstanceCreationDate"):
        if kw in ds:
            setattr(ds, kw, date)
    for kw in ("ContentTime", "InstanceCreationTime"):
        if kw in ds:
            setattr(ds, kw, time_)
    renamed: dict[str, str] = {}
    for elem in ds.iterall():
        if elem.keyword == "ContributionDateTime":
            elem.value = date + time_
        elif elem.keyword == "DimensionOrganizationUID":
            old = str(elem.value)
            new = renamed.setdefault(
                old, derived_uid(key, str(ds.SOPInstanceUID), "dimension", len(renamed))
            )
            elem.value = new
    return ds


def _check_shape(
    name: str, arr: npt.NDArray[Any], source: Sequence[Dataset], frames: SourceFrames
) -> None:
    problem = frames.check(source)
    if problem is not None:
        raise UsageError(f"source frames do not fit the source images: {problem}")
    expected = frames.shape(source)
    if tuple(arr.shape) != expected:
        raise UsageError(
            f"{name} has shape {tuple(arr.shape)} but the source series is [X, Y, Z] = {expected}; "
            "pass arrays in the volume's array order"
        )


def _series_number(source: Sequence[Dataset], kind: str) -> int:
    base = int(getattr(source[0], "SeriesNumber", 0) or 0)
    return (base + _SERIES_OFFSET[kind]) % 2_147_483_647


def _algorithm(options: OutputOptions) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=options.model_name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=options.model_version[:64],
    )


def _derived_series(
    source: Sequence[Dataset], key: str, options: OutputOptions, kind: str, *variant: str
) -> dict[str, Any]:
    """Arguments every derived series shares: its source, stable UIDs, number, device."""
    return {
        "source_images": list(source),
        "series_instance_uid": _uid(key, source, kind, *variant, "series"),
        "series_number": _series_number(source, kind),
        "sop_instance_uid": _uid(key, source, kind, *variant, "instance"),
        "instance_number": 1,
        "manufacturer": options.manufacturer,
        "manufacturer_model_name": options.model_name[:64],
        "software_versions": f"uqserve {__version__}",
        "device_serial_number": options.device_serial_number,
    }
