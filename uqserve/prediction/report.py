"""The typed report of one prediction, as written to ``report.json``.

A ``Report`` is a plain dict at run time (``TypedDict``), so it serialises
with ``json.dumps`` as is and reads back with ``json.loads``; the types say
which keys exist. Keys appear in the file in the order built here. Units:
uncertainties in nats, volumes in mL, times in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

import numpy as np

from uqserve._version import __version__

if TYPE_CHECKING:
    from uqserve.bundle import Bundle, Manifest
    from uqserve.runtime import Runtime
    from uqserve.volumes import Volume

__all__ = [
    "BundleInfo",
    "Entanglement",
    "EntanglementSample",
    "FrameInfo",
    "ImageScores",
    "OodInfo",
    "Outputs",
    "Report",
    "RuntimeInfo",
    "ScanInfo",
    "Scores",
    "Timings",
    "VolumeStats",
    "build_report",
    "jsonable",
    "report_json",
]


class ScanInfo(TypedDict):
    """The scan: file name, array shape ``[X, Y, Z]``, spacing (mm), slicing axis."""

    name: str
    shape: list[int]
    spacing: list[float]
    slice_axis: int
    volume_index: NotRequired[int]  # which volume of a 4D NIfTI, when one was picked
    nonfinite_voxels: int
    sha256: NotRequired[str]  # of the input file (or a DICOM folder's files); files only


class BundleInfo(TypedDict):
    name: str
    au: str
    eu: str
    members: int
    samples: int
    classes: list[str]
    manifest_sha256: str


class RuntimeInfo(TypedDict):
    name: str  # "embedded" or "triton"
    device: str
    precision: NotRequired[str]  # "tf32" or "fp16"; absent for exact float32


class ImageScores(TypedDict):
    """Image-level uncertainty under the bundle's default aggregator (None: not calibrated)."""

    aggregator: str
    tu: float | None
    au: float | None
    eu: float | None
    au_sample: float | None
    au_latent: float | None


class OodInfo(TypedDict):
    """EU score vs the calibrated threshold τ; ``flag`` and ``threshold`` None without τ."""

    score: float
    threshold: float | None
    flag: bool | None
    percentile: float | None  # % of validation scores <= score
    aggregator: str


class EntanglementSample(TypedDict):
    """How ``scan`` was estimated when it ranks a subsample (absent: every voxel)."""

    size: int  # voxels ranked
    population: int  # voxels with TU > 0.05 ln K
    seed: int
    standard_error: float  # of ``scan`` against the exact value


class Entanglement(TypedDict):
    scan: float | None  # Spearman rank correlation of AU and EU over this scan's voxels
    bundle: dict[str, Any] | None  # the manifest's validation-set figures
    sample: NotRequired[EntanglementSample]


class VolumeStats(TypedDict):
    """One class's volume over the M x S coherent samples."""

    mean_ml: float
    std_ml: float
    ci95_ml: list[float]
    n_samples: int


class Timings(TypedDict):
    normalize_s: float
    model_s: float
    accumulate_s: float
    scores_s: float
    predict_s: float
    read_s: NotRequired[float]  # the file steps: only when predict wrote files
    write_s: NotRequired[float]
    total_s: NotRequired[float]


class FrameInfo(TypedDict):
    """report.json's ``geometry``: the chain input -> model grid."""

    input_orientation: str
    input_spacing: list[float]
    model_orientation: str
    model_spacing: list[float]
    model_shape: list[int]
    reoriented: bool
    resampled: bool
    interpolation: list[int]  # image interpolation order per model array axis
    patch: list[int] | None
    windows: int  # graph inputs per slice (1: whole slices)
    crop: NotRequired[dict[str, list[int]]]  # the nonzero box [start, stop) on the scan's grid


class Outputs(TypedDict):
    folder: str
    files: list[str]


class Report(TypedDict):
    scan: ScanInfo
    bundle: BundleInfo
    seed: int
    runtime: RuntimeInfo
    scores: ImageScores
    ood: OodInfo
    entanglement: Entanglement
    volumes: dict[str, VolumeStats]  # per foreground class name
    timings: Timings
    geometry: FrameInfo
    warnings: list[str]
    uqserve_version: str
    outputs: NotRequired[Outputs]  # only when predict wrote files


@dataclass
class Scores:
    """What one scan is summarised into (the report's numbers; ``scoring.py`` computes them)."""

    image: ImageScores
    ood: OodInfo
    entanglement: float | None  # AU~EU Spearman over the scan's voxels
    volumes: dict[str, VolumeStats]
    entanglement_sample: EntanglementSample | None = None  # None: exact


def build_report(
    volume: Volume,
    bundle: Bundle,
    runtime: Runtime,
    *,
    seed: int,
    nonfinite_voxels: int,
    scores: Scores,
    timings: Timings,
    warnings: list[str],
    geometry: FrameInfo,
) -> Report:
    """The report of one prediction (without the file facts ``sha256`` and ``outputs``)."""
    man = bundle.manifest
    index = volume.meta.get("volume_index")
    scan = cast(
        ScanInfo,
        {
            "name": volume.source,
            "shape": list(volume.shape),
            "spacing": [round(s, 6) for s in volume.spacing],
            "slice_axis": int(volume.slice_axis),
            **({"volume_index": index} if index is not None else {}),
            "nonfinite_voxels": nonfinite_voxels,
        },
    )
    return {
        "scan": scan,
        "bundle": {
            "name": man.name,
            "au": man.au,
            "eu": man.eu,
            "members": man.num_members,
            "samples": man.num_samples,
            "classes": list(man.classes),
            "manifest_sha256": bundle.manifest_sha256,
        },
        "seed": seed,
        "runtime": _runtime_info(runtime),
        "scores": scores.image,
        "ood": scores.ood,
        "entanglement": _entanglement(scores, man),
        "volumes": scores.volumes,
        "timings": timings,
        "geometry": geometry,
        "warnings": warnings,
        "uqserve_version": __version__,
    }


def _entanglement(scores: Scores, man: Manifest) -> Entanglement:
    ent: Entanglement = {"scan": scores.entanglement, "bundle": dict(man.entanglement) or None}
    if scores.entanglement_sample is not None:
        ent["sample"] = scores.entanglement_sample
    return ent


def report_json(report: Report) -> str:
    """The text of ``report.json``."""
    return json.dumps(report, indent=2) + "\n"


def jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _runtime_info(runtime: Runtime) -> RuntimeInfo:
    """Name and device; the precision only when it is not exact float32 (the default)."""
    info: RuntimeInfo = {"name": runtime.name, "device": runtime.device}
    if runtime.precision != "fp32":
        info["precision"] = runtime.precision
    return info
