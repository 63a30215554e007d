"""All outputs of one series, built and written."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from uqserve._fs import atomic_file
from uqserve.errors import UsageError
from uqserve.sidecar._source_frames import SourceFrames
from uqserve.sidecar.outputs.attributes import (
    make_deterministic,
    sanitize_sources,
)
from uqserve.sidecar.outputs.common import (
    MAP_KINDS,
    OutputOptions,
)
from uqserve.sidecar.outputs.images import (
    make_fractional_segmentation,
    make_parametric_map,
    make_segmentation,
)
from uqserve.sidecar.outputs.sr import make_report
from uqserve.sidecar.outputs.uids import content_digest


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
