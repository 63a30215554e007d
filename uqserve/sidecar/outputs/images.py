"""DICOM SEG (binary and fractional) and parametric maps of TU, AU and EU."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from uqserve.errors import UsageError
from uqserve.sidecar._source_frames import SourceFrames
from uqserve.sidecar.outputs.attributes import (
    _algorithm,
    _check_shape,
    _derived_series,
)
from uqserve.sidecar.outputs.common import (
    MAP_KINDS,
    NAT,
    SCHEME,
    OutputOptions,
)
from uqserve.sidecar.outputs.uids import derived_uid


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
