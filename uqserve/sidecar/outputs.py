"""DICOM results for a PACS, built with highdicom from one prediction.

For a source series (single-frame CT/MR images, sorted as the volume's last
axis) this module writes, each in its own series of the source study:

* a **DICOM SEG** of the segmentation (``BINARY``, the widely supported form,
  one segment per foreground class; or ``LABELMAP``, newer and smaller, which
  older PACS and validators do not know yet);
* three **Parametric Maps** (float32) for total, aleatoric and epistemic
  uncertainty, with a Real World Value Mapping whose unit is nats
  (UCUM ``{nat}``) and a window from 0 to ln K;
* optionally a **FRACTIONAL SEG** of the foreground probability (viewer
  support is uneven, hence off by default);
* a **Comprehensive SR** with the report facts (OOD flag, score and threshold,
  per-class volume with its 95 % interval, AU/EU entanglement) as coded and
  numeric items plus one plain-language summary line. SR rather than an
  Encapsulated PDF: it needs no PDF renderer, every PACS stores it, viewers
  (OHIF, Weasis, Orthanc's Stone viewer, dcmtk's ``dsr2html``) show it as
  text, and the numbers stay machine-readable with units.

Every UID of an output is derived from a key (the bundle checksum and seed),
the source series UID and the set of source SOP Instance UIDs
(:func:`build_outputs` adds the images' content too), and every
date and time in it from the source series (:func:`make_deterministic`): the
same series processed twice — after a crash, say — gives byte-identical
objects, and a different set of instances (part of a series re-sent) gives
different UIDs, so a PACS never holds two different objects under one UID.

Patient and study attributes highdicom copies and refuses when invalid (a
PatientSex of ``U``, an impossible date) are blanked in a copy of the source
(:func:`sanitize_sources`) and named in the SR instead of failing the series.

Array conventions: ``[X=columns, Y=rows, Z=slices]`` as in
:class:`uqserve.volumes.Volume`; ``prob`` is ``[K, X, Y, Z]``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM, validate_value

from uqserve._fs import atomic_file
from uqserve._version import __version__
from uqserve.errors import UsageError
from uqserve.sidecar._source_frames import SourceFrames

__all__ = [
    "MAP_KINDS",
    "OutputOptions",
    "SourceFrames",
    "build_outputs",
    "content_digest",
    "derived_uid",
    "make_deterministic",
    "make_fractional_segmentation",
    "make_parametric_map",
    "make_report",
    "make_segmentation",
    "sanitize_sources",
    "source_digest",
    "write_datasets",
]

# Private coding scheme for concepts no standard terminology has (DICOM PS3.16 8.2: "99" prefix).
SCHEME = "99UQSERVE"
NAT = hd.sr.CodedConcept("{nat}", "UCUM", "nat")
MILLILITER = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")

MAP_KINDS: dict[str, tuple[str, str]] = {
    "tu": ("Total uncertainty", "entropy of the mean prediction, H[mean p] (nats)"),
    "au": ("Aleatoric uncertainty", "expected entropy of the member predictions (nats)"),
    "eu": ("Epistemic uncertainty", "mutual information between label and member, TU - AU (nats)"),
}
# Series numbers of the outputs: source series number + offset keeps them next to their source.
_SERIES_OFFSET = {"seg": 9000, "tu": 9001, "au": 9002, "eu": 9003, "prob": 9004, "report": 9005}


@dataclass(frozen=True)
class OutputOptions:
    """What to build and how to label it.

    seg_type    ``binary`` (default) or ``labelmap``
    fractional  also write a FRACTIONAL SEG of the foreground probability
    report      also write the Comprehensive SR report
    model_name  shown as algorithm name and Manufacturer's Model Name (the bundle name)
    model_version  algorithm version (uqserve version and bundle checksum)
    """

    seg_type: str = "binary"
    fractional: bool = False
    report: bool = True
    model_name: str = "uqserve"
    model_version: str = __version__
    manufacturer: str = "uqserve"
    device_serial_number: str = "0"

    def __post_init__(self) -> None:
        if self.seg_type not in ("binary", "labelmap"):
            raise UsageError(f"seg_type {self.seg_type!r}: choose 'binary' or 'labelmap'")


def derived_uid(*parts: object) -> str:
    """A deterministic UID (``2.25.<128-bit integer>``) from ``parts``."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def source_digest(source: Sequence[Dataset]) -> str:
    """A hash of the sorted SOP Instance UIDs of ``source``: which images an output covers."""
    uids = sorted(str(ds.SOPInstanceUID) for ds in source)
    return hashlib.sha256("\x1f".join(uids).encode()).hexdigest()[:32]


def content_digest(source: Sequence[Dataset]) -> str:
    """A hash of everything ``source`` holds: every element of every image (sorted
    by SOP Instance UID), pixel data as its bytes.

    :func:`build_outputs` adds it to the key, so a sender that breaks the DICOM
    rule and re-sends an image under its old UID with new content (a corrected
    patient name, say) gets results under new UIDs, never different results
    under the old ones.
    """
    h = hashlib.sha256()
    for ds in sorted(source, key=lambda d: str(d.SOPInstanceUID)):
        for elem in ds:
            value = elem.value
            h.update(f"{elem.tag}\x1f".encode())
            h.update(value if isinstance(value, bytes) else repr(value).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def _uid(key: str, source: Sequence[Dataset], *parts: object) -> str:
    """An output UID: the key, the source series, the set of its images, the role."""
    series_uid = str(source[0].SeriesInstanceUID)
    return derived_uid(key, series_uid, source_digest(source), *parts)


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


def _segment_descriptions(
    classes: Sequence[str], label: str, key: str, options: OutputOptions
) -> list[hd.seg.SegmentDescription]:
    """One segment per foreground class ``classes[1:]`` (number = label value);
    ``label`` formats the class name into the segment label, e.g. ``"P({})"``."""
    return [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=label.format(name)[:64],
            segmented_property_category=hd.sr.CodedConcept(
                "MODELCLASS", SCHEME, "Model output class"
            ),
            segmented_property_type=_class_concept(name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(options),
            tracking_uid=derived_uid(key, "segment", k),
            tracking_id=f"{name} ({options.model_name})"[:64],
        )
        for k, name in enumerate(classes[1:], start=1)
    ]


def _class_concept(name: str) -> hd.sr.CodedConcept:
    slug = "".join(c if c.isalnum() else "_" for c in name.upper())[:16] or "CLASS"
    return hd.sr.CodedConcept(slug, SCHEME, name[:64])


def make_segmentation(
    source: Sequence[Dataset],
    labels: npt.NDArray[np.integer[Any]],
    classes: Sequence[str],
    *,
    key: str,
    options: OutputOptions = OutputOptions(),
    frames: SourceFrames = SourceFrames(),
) -> hd.seg.Segmentation:
    """A BINARY or LABELMAP DICOM SEG from ``labels [X, Y, Z]`` (0 = background).

    One segment per foreground class ``classes[1:]``, segment number = label value.
    ``frames`` maps slices to the source's frames (multi-frame sources, mosaics).
    """
    _check_shape("labels", labels, source, frames)
    if len(classes) < 2:
        raise UsageError("classes needs background plus at least one foreground class")
    if labels.size and int(labels.max()) >= len(classes):
        raise UsageError(
            f"labels hold value {int(labels.max())} but there are only {len(classes)} classes"
        )
    seg_type = hd.seg.SegmentationTypeValues[options.seg_type.upper()]
    return hd.seg.Segmentation(
        pixel_array=frames.frames(labels.astype(np.uint8)),
        segmentation_type=seg_type,
        segment_descriptions=_segment_descriptions(classes, "{}", key, options),
        **_derived_series(source, key, options, "seg", options.seg_type),
        **frames.geometry(labels.shape[2]),
        content_label="SEGMENTATION",
        content_description=f"uqserve segmentation ({options.model_name})"[:64],
        series_description=f"uqserve segmentation ({options.model_name})"[:64],
        omit_empty_frames=False,
    )


def make_fractional_segmentation(
    source: Sequence[Dataset],
    prob: npt.NDArray[np.floating[Any]],
    classes: Sequence[str],
    *,
    key: str,
    options: OutputOptions = OutputOptions(),
    frames: SourceFrames = SourceFrames(),
) -> hd.seg.Segmentation:
    """A FRACTIONAL (PROBABILITY) SEG of ``prob [K, X, Y, Z]`` for each foreground class."""
    if prob.ndim != 4 or prob.shape[0] != len(classes):
        raise UsageError(f"prob must be [K={len(classes)}, X, Y, Z], got {tuple(prob.shape)}")
    _check_shape("prob[k]", prob[0], source, frames)
    # [Z, rows, cols, segments]
    pixels = np.stack(
        [
            frames.frames(np.clip(prob[k], 0.0, 1.0).astype(np.float32))
            for k in range(1, len(classes))
        ],
        -1,
    )
    return hd.seg.Segmentation(
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=_segment_descriptions(classes, "P({})", key, options),
        **_derived_series(source, key, options, "prob"),
        **frames.geometry(prob.shape[3]),
        content_label="PROBABILITY",
        content_description=f"uqserve foreground probability ({options.model_name})"[:64],
        series_description=f"uqserve probability ({options.model_name})"[:64],
        omit_empty_frames=False,
    )


def make_parametric_map(
    source: Sequence[Dataset],
    values: npt.NDArray[np.floating[Any]],
    kind: str,
    *,
    num_classes: int,
    key: str,
    options: OutputOptions = OutputOptions(),
    frames: SourceFrames = SourceFrames(),
) -> hd.pm.ParametricMap:
    """A float32 Parametric Map of one uncertainty map ``values [X, Y, Z]`` in nats.

    ``kind`` is ``tu``, ``au`` or ``eu``; the window spans 0 to ln K, the
    largest entropy ``num_classes`` classes allow.
    """
    if kind not in MAP_KINDS:
        raise UsageError(f"kind {kind!r}: choose one of {', '.join(MAP_KINDS)}")
    _check_shape(f"{kind} map", values, source, frames)
    data = frames.frames(np.asarray(values, dtype=np.float32))
    if not np.all(np.isfinite(data)):
        raise UsageError(f"{kind} map holds NaN or infinite values")
    title, explanation = MAP_KINDS[kind]
    ln_k = math.log(max(num_classes, 2))
    lo, hi = float(data.min()), float(data.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=kind.upper(),
        lut_explanation=f"{title}: {explanation}"[:64],
        unit=NAT,
        value_range=(min(lo, 0.0), max(hi, ln_k)),
        slope=1.0,
        intercept=0.0,
        quantity_definition=hd.sr.CodedConcept(kind.upper(), SCHEME, title),
    )
    pm = hd.pm.ParametricMap(
        pixel_array=data,
        **_derived_series(source, key, options, kind),
        **frames.geometry(values.shape[2]),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # Width ln K < 1 is only valid with LINEAR_EXACT (PS3.3 C.11.2.1.3).
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=ln_k / 2,
                window_width=ln_k,
                window_explanation="0 to ln K nats",
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
            )
        ],
        content_label=kind.upper(),
        content_description=f"{title} (nats)"[:64],
        series_description=f"uqserve {title.lower()} (nats)"[:64],
    )
    if "Laterality" not in pm:
        # General Series Type 2C: dciodvfy requires it (empty = unknown) when the
        # frames carry no Frame Laterality, as here.
        pm.Laterality = getattr(source[0], "Laterality", None) or ""
    return pm


def _num(name: str, value: float, unit: hd.sr.CodedConcept, code: str) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=hd.sr.CodedConcept(code, SCHEME, name[:64]),
        value=float(value),
        unit=unit,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _text(name: str, value: str, code: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=hd.sr.CodedConcept(code, SCHEME, name[:64]),
        value=value,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def report_facts(report: Mapping[str, Any]) -> dict[str, Any]:
    """The facts a reader needs, pulled from a predict report (tolerant of missing keys).

    Returns ``ood`` (dict with score, threshold, flag, percentile, or None),
    ``entanglement`` (float or None), ``volumes`` ({class: {mean_ml, ci95_ml}}),
    ``model`` (str).
    """
    ood = report.get("ood")
    ood = dict(ood) if isinstance(ood, Mapping) else None
    ent = report.get("entanglement")
    if isinstance(ent, Mapping):
        ent = ent.get("scan", ent.get("spearman", ent.get("value")))
    entanglement = (
        float(ent) if isinstance(ent, (int, float)) and math.isfinite(float(ent)) else None
    )
    volumes = report.get("volumes", report.get("volume_distribution", {}))
    volumes = (
        {str(k): dict(v) for k, v in volumes.items() if isinstance(v, Mapping)}
        if isinstance(volumes, Mapping)
        else {}
    )
    bundle = report.get("bundle")
    model = (
        str(bundle.get("name", ""))
        if isinstance(bundle, Mapping)
        else str(bundle or report.get("model", ""))
    )
    return {"ood": ood, "entanglement": entanglement, "volumes": volumes, "model": model}


def summary_line(report: Mapping[str, Any]) -> str:
    """One plain-language sentence for a radiologist."""
    facts = report_facts(report)
    parts = []
    ood = facts["ood"]
    if ood and ood.get("flag") is not None and ood.get("threshold") is not None:
        verdict = "UNUSUAL (out of distribution)" if ood["flag"] else "typical (in distribution)"
        pct = ood.get("percentile")
        pct_s = f", {float(pct):.0f}th percentile of validation scans" if pct is not None else ""
        parts.append(
            f"Scan looks {verdict} for this model: EU score {float(ood['score']):.4g} vs threshold "
            f"{float(ood['threshold']):.4g}{pct_s}."
        )
    else:
        parts.append("No OOD threshold calibrated for this model: OOD flag not available.")
    for name, v in facts["volumes"].items():
        ci = v.get("ci95_ml")
        ci_s = f" (95 % interval {float(ci[0]):.3g}-{float(ci[1]):.3g} mL)" if ci else ""
        parts.append(f"{name} volume {float(v.get('mean_ml', float('nan'))):.3g} mL{ci_s}.")
    if facts["entanglement"] is not None:
        parts.append(
            f"AU-EU rank correlation in this scan {facts['entanglement']:.2f} "
            "(near 1: EU mirrors AU)."
        )
    parts.append("Research use only; not for diagnosis.")
    return " ".join(parts)


def make_report(
    source: Sequence[Dataset],
    report: Mapping[str, Any],
    *,
    key: str,
    options: OutputOptions = OutputOptions(),
    evidence: Sequence[Dataset] = (),
    omitted: Sequence[str] = (),
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR holding the report facts as coded, numeric and text items.

    ``evidence`` (e.g. the SEG and maps) is listed with the source images in
    the Current Requested Procedure Evidence Sequence. ``omitted`` names source
    attributes left empty in every output because their values were invalid.
    """
    facts = report_facts(report)
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("UQREPORT", SCHEME, "Segmentation uncertainty report"),
    )
    items: list[Any] = [_text("Summary", summary_line(report), "SUMMARY")]
    items.append(_text("Model", f"{options.model_name} ({options.model_version})", "MODEL"))
    if omitted:
        note = (
            f"Left empty in these results because the source images hold invalid values: "
            f"{', '.join(omitted)}."
        )
        items.append(_text("Omitted source attributes", note, "OMITTED"))
    ood = facts["ood"]
    if ood and ood.get("score") is not None:
        items.append(_num("OOD score (image-level EU)", float(ood["score"]), NAT, "OODSCORE"))
        if ood.get("threshold") is not None:
            items.append(_num("OOD threshold", float(ood["threshold"]), NAT, "OODTHRESH"))
        if ood.get("percentile") is not None:
            items.append(
                _num(
                    "OOD score percentile among validation scans",
                    float(ood["percentile"]),
                    PERCENT,
                    "OODPCT",
                )
            )
        if ood.get("flag") is not None and ood.get("threshold") is not None:
            items.append(
                hd.sr.CodeContentItem(
                    name=hd.sr.CodedConcept("OODFLAG", SCHEME, "Out of distribution"),
                    value=codes.SCT.Yes if ood["flag"] else codes.SCT.No,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
    if facts["entanglement"] is not None:
        items.append(
            _num(
                "AU-EU Spearman correlation (entanglement)",
                facts["entanglement"],
                UNITY,
                "ENTANGLE",
            )
        )
    for i, (name, v) in enumerate(facts["volumes"].items()):
        if v.get("mean_ml") is not None:
            items.append(
                _num(f"{name} volume, mean", float(v["mean_ml"]), MILLILITER, f"VOLMEAN{i}")
            )
        ci = v.get("ci95_ml")
        if ci:
            items.append(
                _num(f"{name} volume, 2.5 % quantile", float(ci[0]), MILLILITER, f"VOLLO{i}")
            )
            items.append(
                _num(f"{name} volume, 97.5 % quantile", float(ci[1]), MILLILITER, f"VOLHI{i}")
            )
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[*source, *evidence],
        content=root,
        series_instance_uid=_uid(key, source, "report", "series"),
        series_number=_series_number(source, "report"),
        sop_instance_uid=_uid(key, source, "report", "instance"),
        instance_number=1,
        manufacturer=options.manufacturer,
        is_complete=True,
        series_description=f"uqserve report ({options.model_name})"[:64],
    )


def build_outputs(
    source: Sequence[Dataset],
    *,
    seg: npt.NDArray[np.integer[Any]],
    maps: Mapping[str, npt.NDArray[np.floating[Any]]],
    classes: Sequence[str],
    key: str,
    prob: npt.NDArray[np.floating[Any]] | None = None,
    report: Mapping[str, Any] | None = None,
    options: OutputOptions = OutputOptions(),
    frames: SourceFrames = SourceFrames(),
) -> list[Dataset]:
    """Every output object for one series: SEG, TU/AU/EU maps, [fractional SEG], [SR].

    ``source`` sorted as the volume's last axis (or the one multi-frame image or
    mosaic, with ``frames`` from :meth:`SourceFrames.of` of the series); ``seg [X, Y, Z]``;
    ``maps`` has ``tu``, ``au``, ``eu`` ``[X, Y, Z]``; ``prob [K, X, Y, Z]`` is
    needed when ``options.fractional``. ``key`` makes the UIDs deterministic
    (use the bundle checksum and the seed). Invalid copied patient/study
    attributes are left empty and named in the SR (:func:`sanitize_sources`).
    """
    if not source:
        raise UsageError("no source images")
    missing = [k for k in MAP_KINDS if k not in maps]
    if missing:
        raise UsageError(f"maps lacks {', '.join(missing)}; pass tu, au and eu")
    key = f"{key}:{content_digest(source)}"
    source, omitted = sanitize_sources(source)
    source = frames.prepare(source)
    kw: dict[str, Any] = {"key": key, "options": options, "frames": frames}
    out: list[Dataset] = [make_segmentation(source, seg, classes, **kw)]
    for kind in MAP_KINDS:
        out.append(make_parametric_map(source, maps[kind], kind, num_classes=len(classes), **kw))
    if options.fractional:
        if prob is None:
            raise UsageError("options.fractional needs prob [K, X, Y, Z]")
        out.append(make_fractional_segmentation(source, prob, classes, **kw))
    if options.report and report is not None:
        out.append(
            make_report(
                source, report, key=key, options=options, evidence=list(out), omitted=omitted
            )
        )
    return [make_deterministic(ds, source, key) for ds in out]


def output_name(ds: Dataset) -> str:
    """A file name for an output that carries no identifier: kind + UID hash."""
    kind = {"SEG": "seg", "SR": "report"}.get(str(ds.Modality), "map")
    label = str(getattr(ds, "ContentLabel", kind)).lower()
    return f"{label}-{hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:12]}.dcm"


def write_datasets(datasets: Sequence[Dataset], folder: str | os.PathLike[str]) -> list[Path]:
    """Save each dataset into ``folder`` atomically (temp file, fsync, rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        target = folder / output_name(ds)
        with atomic_file(target, "wb", fsync=True) as f:
            ds.save_as(f, enforce_file_format=True)
        paths.append(target)
    return paths
