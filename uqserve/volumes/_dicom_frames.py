"""Frames of one DICOM object that holds a whole stack: enhanced multi-frame and mosaics.

Two ways a single DICOM object carries many slices:

* **Enhanced multi-frame** (Enhanced CT/MR Image Storage, and the Legacy
  Converted Enhanced classes): each frame's geometry lives in the functional
  groups, per frame or shared: Plane Position (Image Position (Patient)),
  Plane Orientation, Pixel Measures (Pixel Spacing, Slice Thickness, Spacing
  Between Slices) and Pixel Value Transformation (Rescale Slope/Intercept).
  pydicom reads the sequences and decodes the frames.
* **Siemens mosaics**: one single-frame MR image whose pixel matrix is a grid
  of tiles, one per slice. The tile count and the slice normal are in the
  Siemens CSA header; nibabel's ``nicom`` reads it, unpacks the tiles and
  corrects the position of the first slice (Image Position (Patient) of a
  mosaic is that of the whole grid, not of a slice).

:func:`frame_stack` turns either into a :class:`FrameStack` (per-frame
positions in source order plus a pixel reader); :mod:`uqserve.volumes.dicom`
sorts it along the normal and checks it is one regular stack, as for a
series of single-frame images. A classic series gives ``None``.

Messages name the file and tags, never tag values that identify a person.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from uqserve.volumes.base import VolumeError, check_voxel_count

__all__ = ["FrameStack", "frame_stack", "is_mosaic", "is_multiframe"]

# Dimensions that only say where a frame lies in one stack; any other dimension whose
# index varies (echo, b-value, time, ...) makes the object hold several stacks.
_SPATIAL_DIMENSIONS = {
    0x00209056,  # Stack ID
    0x00209057,  # In-Stack Position Number
    0x00200032,  # Image Position (Patient)
}
_ORIENTATION_TOL = 1e-4


@dataclass(frozen=True)
class FrameStack:
    """Slices of one DICOM object in source order.

    positions     ``[F, 3]`` Image Position (Patient) of each frame, LPS mm
    orientation   ``[6]`` Image Orientation (Patient) shared by all frames
    spacing_rc    ``[2]`` Pixel Spacing (row, column) mm
    measures      a dataset with Spacing Between Slices / Slice Thickness, for one frame
    frame_numbers ``[F]`` 1-based frame (or mosaic tile) number of each slice
    layout        ``enhanced`` or ``mosaic``
    pixels        reads every frame: ``[F, rows, cols]`` float32 after Rescale Slope/Intercept
    """

    rows: int
    cols: int
    positions: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    spacing_rc: npt.NDArray[np.float64]
    measures: Dataset
    frame_numbers: list[int]
    layout: str
    pixels: Callable[[], npt.NDArray[np.float32]]


def is_multiframe(ds: Dataset, label: str = "image") -> bool:
    """More than one frame, or enhanced functional groups (an enhanced object may hold one)."""
    return "PerFrameFunctionalGroupsSequence" in ds or _int(ds, "NumberOfFrames", 1, label) > 1


def is_mosaic(ds: Dataset) -> bool:
    """A Siemens mosaic: Image Type says ``MOSAIC``."""
    return any(str(v).strip().upper() == "MOSAIC" for v in _values(ds.get("ImageType")))


def frame_stack(
    datasets: Sequence[Dataset], label: str, max_voxels: int | None = None
) -> FrameStack | None:
    """The stack held by one multi-frame or mosaic object; ``None`` for a classic series.

    Raises :class:`VolumeError` for several such objects in one series, for a
    multi-frame object without functional groups, for one holding several
    stacks (echoes, b-values, time points), and for a mosaic whose CSA header
    cannot be read.
    """
    multi = [ds for ds in datasets if is_multiframe(ds, label)]
    mosaics = [ds for ds in datasets if not is_multiframe(ds, label) and is_mosaic(ds)]
    if not multi and not mosaics:
        return None
    what = "multi-frame images" if multi else "mosaic images (time points or directions)"
    if len(datasets) > 1:
        raise VolumeError(
            f"{label}: {len(datasets)} images in one series, of which {len(multi or mosaics)} "
            f"are {what}; uqserve reads one such image per series: "
            "put each file in its own folder"
        )
    ds = datasets[0]
    if multi:
        return _enhanced_stack(ds, label, max_voxels)
    return _mosaic_stack(ds, label, max_voxels)


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _int(ds: Dataset, keyword: str, default: int, label: str = "image") -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise VolumeError(
            f"{label}: {keyword} is not a whole number; the file is damaged"
        ) from None


def _floats(value: Any, n: int, what: str, label: str) -> npt.NDArray[np.float64]:
    try:
        out = np.asarray([float(v) for v in _values(value)], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise VolumeError(
            f"{label}: {what} must hold {n} numbers; the file is damaged: re-export the image"
        )
    return out


# ----- enhanced multi-frame -------------------------------------------------------------


def _group(frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of functional group ``keyword``: per-frame wins over shared."""
    for source in (frame, shared):
        if source is not None and keyword in source and len(source[keyword].value):
            item: Dataset = source[keyword].value[0]
            return item
    return None


def _enhanced_stack(ds: Dataset, label: str, max_voxels: int | None) -> FrameStack:
    sop = getattr(getattr(ds, "SOPClassUID", None), "name", "unknown class")
    n = _int(ds, "NumberOfFrames", 1, label)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if not per_frame:
        raise VolumeError(
            f"{label}: a multi-frame image ({sop}) without per-frame functional groups, so "
            "its frames have no patient geometry; export the series as enhanced CT/MR or "
            "as single-frame (classic) images"
        )
    if len(per_frame) != n:
        raise VolumeError(
            f"{label}: Number of Frames is {n} but there are {len(per_frame)} per-frame "
            "functional groups; the file is damaged: re-export the image"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or [None]
    shared = shared_seq[0]
    rows, cols = _int(ds, "Rows", 0, label), _int(ds, "Columns", 0, label)
    _check_grey(ds, label)
    check_voxel_count(label, (cols, rows, n), max_voxels)
    positions, orientation, spacing, measures = _enhanced_geometry(per_frame, shared, label)
    _check_one_stack(ds, per_frame, positions, orientation, label)
    slope, intercept = _enhanced_rescale(ds, per_frame, shared, label)
    _check_frame_bytes(ds, rows, cols, n, label)

    def pixels() -> npt.NDArray[np.float32]:
        arr = _decode(ds, label).reshape(n, rows, cols).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # inf is refused by the caller
            return arr * slope[:, None, None] + intercept[:, None, None]

    return FrameStack(
        rows=rows,
        cols=cols,
        positions=positions,
        orientation=orientation,
        spacing_rc=spacing,
        measures=measures,
        frame_numbers=list(range(1, n + 1)),
        layout="enhanced",
        pixels=pixels,
    )


def _enhanced_geometry(
    per_frame: list[Dataset], shared: Dataset | None, label: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], Dataset]:
    """``(positions [F, 3], orientation [6], pixel spacing [2], pixel measures)`` of every frame."""
    positions = np.empty((len(per_frame), 3))
    orientation = spacing = None
    measures = Dataset()
    for f, frame in enumerate(per_frame):
        pos = _group(frame, shared, "PlanePositionSequence")
        ori = _group(frame, shared, "PlaneOrientationSequence")
        pm = _group(frame, shared, "PixelMeasuresSequence")
        missing = [
            name
            for name, item, kw in (
                ("Plane Position", pos, "ImagePositionPatient"),
                ("Plane Orientation", ori, "ImageOrientationPatient"),
                ("Pixel Measures", pm, "PixelSpacing"),
            )
            if item is None or kw not in item
        ]
        if missing:
            raise VolumeError(
                f"{label}: frame {f + 1} of the multi-frame image lacks the "
                f"{', '.join(missing)} functional group(s); only cross-sectional images with "
                "patient geometry (CT, MR) can be read"
            )
        assert pos is not None and ori is not None and pm is not None
        positions[f] = _floats(pos.ImagePositionPatient, 3, "Image Position (Patient)", label)
        o = _floats(ori.ImageOrientationPatient, 6, "Image Orientation (Patient)", label)
        s = _floats(pm.PixelSpacing, 2, "Pixel Spacing", label)
        if orientation is None or spacing is None:
            orientation, spacing, measures = o, s, pm
        elif not np.allclose(o, orientation, atol=_ORIENTATION_TOL):
            raise VolumeError(
                f"{label}: frames of the multi-frame image differ in Image Orientation "
                "(Patient) (several stacks, e.g. a three-plane localiser); "
                "export each stack as its own series"
            )
        elif not np.allclose(s, spacing, rtol=1e-4):
            raise VolumeError(
                f"{label}: frames of the multi-frame image differ in Pixel Spacing; "
                "export each stack as its own series"
            )
    assert orientation is not None and spacing is not None
    return positions, orientation, spacing, measures


def _check_one_stack(
    ds: Dataset,
    per_frame: list[Dataset],
    positions: npt.NDArray[np.float64],
    orientation: npt.NDArray[np.float64],
    label: str,
) -> None:
    """Refuse frames that form several stacks: a non-spatial dimension varies, or
    two frames share one position."""
    varying, combinations = _varying_dimensions(ds, per_frame)
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.round(positions @ normal, 3)
    n_positions = len(np.unique(along))
    if not varying and n_positions == len(positions):
        return
    names = ", ".join(varying) or "repeated slice positions"
    stacks = combinations if varying else round(len(positions) / max(n_positions, 1))
    per_stack = round(len(positions) / max(stacks, 1))
    raise VolumeError(
        f"{label}: the multi-frame image holds about {max(stacks, 2)} stacks of {per_stack} "
        f"slices ({names}); uqserve reads one stack: pick one on the scanner or PACS "
        f"(export one series per {varying[0] if varying else 'stack'}) and send that"
    )


def _varying_dimensions(ds: Dataset, per_frame: list[Dataset]) -> tuple[list[str], int]:
    """Labels of the non-spatial dimensions (Dimension Index Sequence) whose index varies,
    and how many combinations of their values the frames hold."""
    dims = list(ds.get("DimensionIndexSequence") or [])
    if not dims:
        return [], 1
    indices = []
    for frame in per_frame:
        content = _group(frame, None, "FrameContentSequence")
        values = _values(content.get("DimensionIndexValues")) if content is not None else []
        indices.append(values)
    if any(len(v) != len(dims) for v in indices):
        return [], 1
    names, columns = [], []
    for d, dim in enumerate(dims):
        pointer = int(dim.get("DimensionIndexPointer", 0) or 0)
        if pointer in _SPATIAL_DIMENSIONS:
            continue
        if len({row[d] for row in indices}) > 1:
            names.append(str(dim.get("DimensionDescriptionLabel", "") or f"dimension {d + 1}"))
            columns.append(d)
    combinations = len({tuple(row[d] for d in columns) for row in indices})
    return names, combinations


def _enhanced_rescale(
    ds: Dataset, per_frame: list[Dataset], shared: Dataset | None, label: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Rescale Slope and Intercept ``[F]`` each: Pixel Value Transformation, else the
    top-level attributes, else identity."""
    slope = np.ones(len(per_frame), dtype=np.float32)
    intercept = np.zeros(len(per_frame), dtype=np.float32)
    for f, frame in enumerate(per_frame):
        item = _group(frame, shared, "PixelValueTransformationSequence")
        source = item if item is not None and "RescaleSlope" in item else ds
        if "RescaleSlope" in source and source.RescaleSlope not in (None, ""):
            slope[f] = _floats(source.RescaleSlope, 1, "Rescale Slope", label)[0]
        if "RescaleIntercept" in source and source.RescaleIntercept not in (None, ""):
            intercept[f] = _floats(source.RescaleIntercept, 1, "Rescale Intercept", label)[0]
    if np.any(slope == 0):
        raise VolumeError(
            f"{label}: Rescale Slope is 0, which would erase the image; the file is damaged"
        )
    return slope, intercept


# ----- Siemens mosaic ---------------------------------------------------------------------


def _mosaic_stack(ds: Dataset, label: str, max_voxels: int | None) -> FrameStack:
    """Unpack a mosaic with nibabel's CSA reader; refuse it when the CSA header is unusable."""
    _check_grey(ds, label)
    with warnings.catch_warnings():  # nibabel calls its DICOM readers experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader, dicomwrappers

        try:
            csa = csareader.get_csa_header(ds, "image")
            n = csareader.get_n_mosaic(csa) if csa is not None else None
            wrapper = dicomwrappers.MosaicWrapper(ds, csa_header=csa, n_mosaic=n)
            shape = wrapper.image_shape
            origin = wrapper.image_position
            normal = wrapper.slice_normal
        except Exception:  # nibabel raises many kinds on a damaged header
            n = shape = origin = normal = None
    if not n or shape is None or origin is None or normal is None:
        raise VolumeError(
            f"{label}: a Siemens mosaic whose CSA header cannot be read, so its tiles cannot "
            "be unpacked into slices; export the series without mosaic (single slices or "
            "enhanced MR) and send that"
        )
    rows, cols, n = int(shape[0]), int(shape[1]), int(shape[2])
    check_voxel_count(label, (cols, rows, n), max_voxels)
    spacing = _floats(ds.get("PixelSpacing"), 2, "Pixel Spacing", label)
    step = _mosaic_step(ds, label)
    positions = np.asarray(origin, np.float64)[None, :] + np.outer(
        np.arange(n) * step, np.asarray(normal, np.float64)
    )
    orientation = _floats(ds.get("ImageOrientationPatient"), 6, "Image Orientation", label)
    measures = Dataset()
    measures.SpacingBetweenSlices = step
    slope, intercept = _enhanced_rescale(ds, [Dataset()], None, label)

    def pixels() -> npt.NDArray[np.float32]:
        _check_frame_bytes(ds, _int(ds, "Rows", 0, label), _int(ds, "Columns", 0, label), 1, label)
        _decode(ds, label)  # decoder errors get our message before nibabel sees them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiles = np.asarray(wrapper.get_unscaled_data())  # [rows, cols, n]
        arr = np.transpose(tiles, (2, 0, 1)).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            return arr * slope[0] + intercept[0]

    return FrameStack(
        rows=rows,
        cols=cols,
        positions=positions,
        orientation=orientation,
        spacing_rc=spacing,
        measures=measures,
        frame_numbers=list(range(1, n + 1)),
        layout="mosaic",
        pixels=pixels,
    )


def _mosaic_step(ds: Dataset, label: str) -> float:
    """Distance between mosaic slices (mm): Spacing Between Slices, else Slice Thickness."""
    for kw in ("SpacingBetweenSlices", "SliceThickness"):
        if ds.get(kw) not in (None, ""):
            step = float(_floats(ds.get(kw), 1, kw, label)[0])
            if step > 0:
                return step
    raise VolumeError(
        f"{label}: a mosaic without Spacing Between Slices or Slice Thickness; "
        "the slice positions are unknown: export the series without mosaic"
    )


# ----- pixel data ----------------------------------------------------------------------------


def _check_grey(ds: Dataset, label: str) -> None:
    if "PixelData" not in ds:
        raise VolumeError(f"{label}: an image without Pixel Data; the file is damaged")
    if _int(ds, "SamplesPerPixel", 1, label) != 1:
        raise VolumeError(
            f"{label}: colour images (Samples per Pixel > 1) are not supported; "
            "send grey-scale CT/MR"
        )


def _check_frame_bytes(ds: Dataset, rows: int, cols: int, n: int, label: str) -> None:
    """The header must not claim more pixels than the (uncompressed) data holds."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False):
        return  # encapsulated frames: the voxel limit applies
    bits = _int(ds, "BitsAllocated", 0, label)
    if bits not in (1, 8, 16, 32, 64):
        raise VolumeError(
            f"{label}: Bits Allocated {bits} is not a valid pixel size; the file is damaged"
        )
    need = (rows * cols * n * bits + 7) // 8
    have = len(ds.PixelData)
    if have < need:
        raise VolumeError(
            f"{label}: the header claims {n} frame(s) of {rows}x{cols} pixels ({need:,} bytes) "
            f"but the file holds {have:,} bytes of pixel data; the file is damaged: re-send it"
        )


def _decode(ds: Dataset, label: str) -> npt.NDArray[Any]:
    try:
        arr: npt.NDArray[Any] = ds.pixel_array
    except Exception as exc:  # no decoder for a compressed transfer syntax, or broken data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", "unknown")
        raise VolumeError(
            f"{label}: cannot decode pixel data (transfer syntax {name}: "
            f"{type(exc).__name__}); the data is damaged or needs a decoder: send it "
            "uncompressed or install pylibjpeg / gdcm"
        ) from exc
    return arr
