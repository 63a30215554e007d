"""Reading a DICOM image series into a :class:`~uqserve.volumes.Volume`.

Shared by ``uqserve predict DICOM_DIR`` and the PACS sidecar. A series is a
stack of single-frame images (CT, MR, ...) that share one Series Instance
UID and one geometry; the slices are ordered by their position along the
slice normal, not by file name or Instance Number (both are unreliable).

Array order follows NIfTI: ``data[i, j, k]`` with ``i`` = column,
``j`` = row, ``k`` = slice, so ``data[:, :, k]`` is ``pixel_array.T`` of the
``k``-th dataset. The affine maps ``(i, j, k)`` to RAS+ millimetres: DICOM's
patient coordinates are LPS, so x and y change sign.

Nothing here logs or puts in a message a patient identifier: messages name
files and tags, never tag values that identify a person.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from uqserve.volumes._dicom_frames import FrameStack, frame_stack
from uqserve.volumes.base import (
    Volume,
    VolumeError,
    check_voxel_count,
    geometry_warnings,
    intensity_warnings,
)

__all__ = ["DicomSeries", "read_series", "uid_hash"]

# Geometry tolerances: scanners write positions with ~1e-3 mm precision.
_ORIENTATION_TOL = 1e-4
_SPACING_REL_TOL = 0.01  # 1 % of the slice spacing
_SPACING_ABS_TOL = 1e-3  # mm
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DicomSeries:
    """One image series read from DICOM.

    volume    the pixel data as a :class:`Volume`, ``data [X=columns, Y=rows, Z=slices]``
              float32 after Rescale Slope/Intercept, affine in RAS+ mm
    datasets  the source datasets, sorted by position along the slice normal, in the
              order of the volume's last axis (pixel data loaded); for a multi-frame
              image or a mosaic, the one dataset that holds every slice
    frame_numbers  for a multi-frame image or a mosaic: the 1-based frame (tile) number
              of each slice along the volume's last axis; ``None`` for single frames
    layout    ``single-frame``, ``enhanced`` (multi-frame with functional groups) or
              ``mosaic`` (Siemens, unpacked from the CSA header)
    """

    volume: Volume
    datasets: list[Dataset]
    frame_numbers: list[int] | None = None
    layout: str = "single-frame"

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def modality(self) -> str:
        return str(getattr(self.datasets[0], "Modality", ""))


def uid_hash(uid: str, length: int = 12) -> str:
    """A short, stable, non-reversible name for a UID, safe to log."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:length]


def read_series(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | Dataset],
    *,
    name: str | None = None,
    max_voxels: int | None = None,
) -> DicomSeries:
    """Read one DICOM image series from a folder, a list of files or datasets.

    ``source`` is a folder (every file in it, recursively; files that are not
    DICOM, and DICOMDIR files, are skipped), or a sequence of file paths or
    already-read :class:`pydicom.Dataset` objects. ``name`` replaces the folder
    name in messages and in ``Volume.source``.

    Raises :class:`VolumeError` naming what is wrong and what to do when the
    files hold more than one series, no image, images of different geometry
    (orientation, rows/columns, pixel spacing), duplicate or missing slices
    (non-uniform spacing along the normal), colour or compressed pixel data
    that cannot be decoded. Sizes are checked before any pixel buffer is
    allocated: :class:`InputTooLargeError` when rows x columns x slices exceeds
    ``max_voxels`` (default: ``uqserve.volumes.base.voxel_limit``), and
    :class:`VolumeError` when a header claims more pixels than its file holds.
    """
    label, items = _collect(source, name)
    loaded = [_load(item, label) for item in items]
    datasets = [ds for ds in loaded if ds is not None]
    if not datasets:
        raise VolumeError(f"{label}: no DICOM image found; pass a folder holding one image series")
    stack = frame_stack(datasets, label, max_voxels)
    if stack is not None:
        return _read_stack(stack, datasets[0], label)
    _check_one_series(datasets, label)
    for ds in datasets:
        _check_geometry_values(ds, label)
    first = datasets[0]
    rows, cols, iop, spacing_rc = _common_geometry(datasets, label)
    row_dir, col_dir, normal = _slice_axes(iop, label)
    datasets, positions, along = _sort_along_normal(datasets, iop, normal, label)
    n = len(datasets)
    slice_vec = _slice_vector(positions, along, first, normal, label)

    affine = _affine(row_dir, col_dir, spacing_rc, slice_vec, positions[0])
    data = _read_pixels(datasets, rows, cols, label, max_voxels)
    return DicomSeries(volume=_volume(data, affine, first, label, n), datasets=datasets)


def _affine(
    row_dir: npt.NDArray[np.float64],
    col_dir: npt.NDArray[np.float64],
    spacing_rc: npt.NDArray[np.float64],
    slice_vec: npt.NDArray[np.float64],
    origin: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """The ``[4, 4]`` RAS+ affine of voxel ``(i=column, j=row, k=slice)`` from LPS geometry."""
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_rc[1]  # i = column index moves along the row direction
    lps[:3, 1] = col_dir * spacing_rc[0]  # j = row index moves along the column direction
    lps[:3, 2] = slice_vec
    lps[:3, 3] = origin
    affine: npt.NDArray[np.float64] = _LPS_TO_RAS @ lps
    return affine


def _volume(
    data: npt.NDArray[np.float32],
    affine: npt.NDArray[np.float64],
    first: Dataset,
    label: str,
    n: int,
    **meta: object,
) -> Volume:
    return Volume(
        data=data,
        affine=affine,
        source=label,
        header=None,
        slice_axis=2,
        meta={
            "format": "dicom",
            "modality": str(getattr(first, "Modality", "")),
            "series": uid_hash(str(getattr(first, "SeriesInstanceUID", ""))),
            "num_instances": n,
            **meta,
            "warnings": geometry_warnings(label, affine) + intensity_warnings(data),
        },
    )


def _read_stack(stack: FrameStack, ds: Dataset, label: str) -> DicomSeries:
    """One enhanced multi-frame image or mosaic: its frames sorted along the normal,
    checked to be one regular stack, as a series of single frames would be."""
    if not str(getattr(ds, "SeriesInstanceUID", "")):
        raise VolumeError(
            f"{label}: an image without a Series Instance UID; the file is not a valid series"
        )
    probe = Dataset()  # the frames' shared geometry, checked as a single frame's would be
    probe.ImagePositionPatient = [float(v) for v in stack.positions[0]]
    probe.ImageOrientationPatient = [float(v) for v in stack.orientation]
    probe.PixelSpacing = [float(v) for v in stack.spacing_rc]
    _check_geometry_values(probe, label)
    row_dir, col_dir, normal = _slice_axes(stack.orientation, label)
    along = stack.positions @ normal
    order = np.argsort(along, kind="stable")
    positions = stack.positions[order]
    slice_vec = _slice_vector(positions, along[order], stack.measures, normal, label)
    affine = _affine(row_dir, col_dir, stack.spacing_rc, slice_vec, positions[0])
    frames = stack.pixels()  # [F, rows, cols]
    data = np.ascontiguousarray(np.transpose(frames[order], (2, 1, 0)), dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise VolumeError(f"{label}: pixel data holds NaN or infinite values; the file is damaged")
    volume = _volume(data, affine, ds, label, 1, frames=len(order), layout=stack.layout)
    numbers = [stack.frame_numbers[i] for i in order]
    return DicomSeries(volume=volume, datasets=[ds], frame_numbers=numbers, layout=stack.layout)


def _check_one_series(datasets: list[Dataset], label: str) -> None:
    """One Series Instance UID, single-frame images only (each checked by ``_check_image``)."""
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise VolumeError(
            f"{label}: files from {len(series)} different series (Series Instance UID); "
            "put each series in its own folder"
        )
    if "" in series:
        raise VolumeError(
            f"{label}: images without a Series Instance UID; the files are not a valid series"
        )
    for ds in datasets:  # multi-frame images and mosaics are read by _read_stack
        _check_image(ds, label)


def _common_geometry(
    datasets: list[Dataset], label: str
) -> tuple[int, int, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(rows, columns, orientation [6], pixel spacing [2] (row, column) mm)`` shared by all."""
    first = datasets[0]
    rows, cols = int(first.Rows), int(first.Columns)
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    spacing_rc = np.asarray(first.PixelSpacing, dtype=np.float64)
    for ds in datasets[1:]:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise VolumeError(
                f"{label}: images of different size ({rows}x{cols} and {ds.Rows}x{ds.Columns}); "
                "the series mixes acquisitions: split it"
            )
        if not np.allclose(
            np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=_ORIENTATION_TOL
        ):
            raise VolumeError(
                f"{label}: images with different Image Orientation (Patient) (a gantry tilt, "
                "localiser or mixed stack); split the series"
            )
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), spacing_rc, rtol=1e-4):
            raise VolumeError(f"{label}: images with different Pixel Spacing; split the series")
    return rows, cols, iop, spacing_rc


def _slice_axes(
    iop: npt.NDArray[np.float64], label: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit row and column directions and the slice normal (LPS) from the orientation."""
    row_dir, col_dir = iop[:3], iop[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1, atol=1e-3)
        and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-3)
    ):
        raise VolumeError(
            f"{label}: Image Orientation (Patient) is not made of unit vectors; "
            "the files are damaged"
        )
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _sort_along_normal(
    datasets: list[Dataset],
    iop: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    label: str,
) -> tuple[list[Dataset], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Datasets sorted by position along ``normal``, their positions [Z, 3] LPS and [Z] mm."""
    positions = np.asarray(
        [ds.ImagePositionPatient for ds in datasets], dtype=np.float64
    )  # [Z, 3] LPS
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(iop))):
        raise VolumeError(
            f"{label}: Image Position / Orientation (Patient) holds values that are not "
            "numbers; the files are damaged"
        )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    return [datasets[i] for i in order], positions[order], along[order]


def _slice_vector(
    positions: npt.NDArray[np.float64],
    along: npt.NDArray[np.float64],
    first: Dataset,
    normal: npt.NDArray[np.float64],
    label: str,
) -> npt.NDArray[np.float64]:
    """The step [3] (LPS mm) from one slice to the next; the series must be uniform and whole.

    One slice: the normal times Spacing Between Slices, else Slice Thickness, else 1 mm.
    """
    n = len(positions)
    if n == 1:
        thickness = float(
            getattr(first, "SpacingBetweenSlices", None)
            or getattr(first, "SliceThickness", None)
            or 1.0
        )
        return normal * thickness
    gaps = np.diff(along)
    if np.any(gaps < _SPACING_ABS_TOL):
        raise VolumeError(
            f"{label}: {int(np.sum(gaps < _SPACING_ABS_TOL)) + 1} images share one "
            "slice position "
            "(duplicates or several echoes/phases in one series); split the series"
        )
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > max(_SPACING_REL_TOL * step, _SPACING_ABS_TOL):
        missing = int(np.round(np.sum(gaps) / step)) + 1 - n
        what = f"about {missing} slice(s) missing" if missing > 0 else "uneven slice spacing"
        raise VolumeError(
            f"{label}: incomplete or irregular series ({what}; spacing along the normal from "
            f"{gaps.min():.3g} to {gaps.max():.3g} mm); "
            "wait until the whole series has arrived "
            "or resample it to uniform spacing"
        )
    slice_vec: npt.NDArray[np.float64] = (positions[-1] - positions[0]) / (n - 1)
    # In-plane drift would mean a sheared stack; the affine cannot express it per slice.
    offsets = positions - positions[0] - np.outer(np.arange(n), slice_vec)
    if np.max(np.abs(offsets)) > max(_SPACING_REL_TOL * step, _SPACING_ABS_TOL) * 10:
        raise VolumeError(
            f"{label}: slice positions do not lie on one line; split or resample the series"
        )
    return slice_vec


def _read_pixels(
    datasets: list[Dataset], rows: int, cols: int, label: str, max_voxels: int | None
) -> npt.NDArray[np.float32]:
    """The pixel data ``[X=columns, Y=rows, Z=slices]`` float32, sizes checked before allocating."""
    n = len(datasets)
    check_voxel_count(label, (cols, rows, n), max_voxels)
    for ds in datasets:
        _check_pixel_bytes(ds, rows, cols, label)
    data = np.empty((cols, rows, n), dtype=np.float32)
    for k, ds in enumerate(datasets):
        data[:, :, k] = _pixels(ds, label).T
    if not np.all(np.isfinite(data)):
        raise VolumeError(
            f"{label}: pixel data holds NaN or infinite values; the files are damaged"
        )
    return data


def _collect(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | Dataset], name: str | None
) -> tuple[str, list[Path | Dataset]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise VolumeError(
                    f"{label}: empty folder; pass a folder holding one DICOM image series"
                )
            return label, list(files)
        if path.is_file():
            return label, [path]
        raise VolumeError(f"{label}: no such file or folder")
    items: list[Path | Dataset] = [s if isinstance(s, Dataset) else Path(s) for s in source]
    if not items:
        raise VolumeError(f"{name or 'series'}: no files given; pass at least one DICOM image")
    if name is None:
        parents = {p.parent for p in items if isinstance(p, Path)}
        name = str(parents.pop()) if len(parents) == 1 else "series"
    return name, items


def _load(item: Path | Dataset, label: str) -> Dataset | None:
    """Read one file; ``None`` for files that are plainly not DICOM images."""
    if isinstance(item, Dataset):
        return item
    if item.name.upper() == "DICOMDIR":
        return None
    try:
        ds = pydicom.dcmread(item)
    except InvalidDicomError:
        return None  # not DICOM at all (a README, a thumbnail): skip
    except Exception as exc:  # truncated or corrupt file
        raise VolumeError(
            f"{item}: cannot read DICOM ({type(exc).__name__}); "
            "the file is damaged: re-send the series"
        ) from exc
    if "PixelData" not in ds and "SeriesInstanceUID" not in ds:
        return None
    return ds


def _check_image(ds: Dataset, label: str) -> None:
    missing = [
        kw
        for kw in (
            "PixelData",
            "Rows",
            "Columns",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
        )
        if kw not in ds or ds[kw].value in (None, "")
    ]
    if missing:
        raise VolumeError(
            f"{label}: an image lacks {', '.join(missing)} "
            f"(modality {getattr(ds, 'Modality', '?')}); "
            "only cross-sectional images with patient geometry (CT, MR) can be read"
        )
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise VolumeError(
            f"{label}: colour images (Samples per Pixel > 1) are not supported; "
            "send grey-scale CT/MR"
        )


def _numbers(ds: Dataset, keyword: str, count: int, where: str) -> npt.NDArray[np.float64]:
    """``count`` finite numbers from a decimal-string attribute, or a :class:`VolumeError`.

    The message names the attribute, never its value (which may be anything).
    """
    try:
        with warnings.catch_warnings():  # pydicom's warning would quote the value
            warnings.simplefilter("ignore")
            value = ds[keyword].value
        items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        out = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError, OverflowError, KeyError):
        out = np.empty(0)
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        what = "a number" if count == 1 else f"{count} numbers"
        raise VolumeError(
            f"{where}: {keyword} is not {what}; the file is damaged: fix or re-send the series"
        )
    return out


def _check_geometry_values(ds: Dataset, label: str) -> None:
    """Position, orientation, spacing and rescale values that are numbers and make sense.

    Refused, each with its reason: malformed values (wrong count, not numbers),
    a non-orthogonal orientation (results would fail DICOM validation), a zero
    or negative pixel spacing (a mirrored affine) and a zero Rescale Slope
    (every pixel the same value).
    """
    where = str(getattr(ds, "filename", None) or label)
    _numbers(ds, "ImagePositionPatient", 3, where)
    iop = _numbers(ds, "ImageOrientationPatient", 6, where)
    norms = np.linalg.norm(iop.reshape(2, 3), axis=1)
    if np.any(norms < 1e-6) or abs(float(iop[:3] @ iop[3:])) > 1e-3 * norms.prod():
        raise VolumeError(
            f"{where}: ImageOrientationPatient's row and column directions are not "
            "orthogonal; the file is damaged: fix or re-send the series"
        )
    if np.any(_numbers(ds, "PixelSpacing", 2, where) <= 0):
        raise VolumeError(
            f"{where}: PixelSpacing is zero or negative; the file is damaged: "
            "fix or re-send the series"
        )
    for keyword in ("RescaleIntercept", "SliceThickness", "SpacingBetweenSlices"):
        if _present(ds, keyword):
            _numbers(ds, keyword, 1, where)
    if _present(ds, "RescaleSlope") and _numbers(ds, "RescaleSlope", 1, where)[0] == 0:
        raise VolumeError(
            f"{where}: RescaleSlope is 0 (every pixel would read the same); "
            "the file is damaged: fix or re-send the series"
        )


def _present(ds: Dataset, keyword: str) -> bool:
    """The attribute is there with a value (an empty value means absent)."""
    return keyword in ds and ds.get_item(keyword).value not in (None, b"", "")


def _check_pixel_bytes(ds: Dataset, rows: int, cols: int, label: str) -> None:
    """A header must not claim more pixels than the (uncompressed) data holds.

    Checked before decoding: a damaged or hostile header (65535 x 65535) would
    otherwise make the decoder allocate gigabytes for a file of a few bytes.
    """
    where = getattr(ds, "filename", None) or label
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False):
        return  # encapsulated frames: their size says nothing; the voxel limit applies
    bits = int(getattr(ds, "BitsAllocated", 0) or 0)
    if bits not in (1, 8, 16, 32, 64):
        raise VolumeError(
            f"{where}: Bits Allocated {bits} is not a valid pixel size; the file is damaged"
        )
    need = (rows * cols * bits + 7) // 8
    have = len(ds.PixelData)
    if have < need:
        raise VolumeError(
            f"{where}: the header claims {rows}x{cols} pixels ({need:,} bytes) but the file holds "
            f"{have:,} bytes of pixel data; the file is damaged: re-send the series"
        )


def _pixels(ds: Dataset, label: str) -> npt.NDArray[np.float32]:
    """Pixel values of one single-frame image after Rescale Slope/Intercept, ``[rows, cols]``."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # no decoder for a compressed transfer syntax, or broken data
        where = getattr(ds, "filename", None) or label
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and getattr(ts, "is_compressed", False):
            raise VolumeError(
                f"{where}: cannot decode pixel data "
                f"(transfer syntax {ts.name}: {type(exc).__name__}); "
                "the data is damaged or needs a decoder: send the series uncompressed or install "
                "pylibjpeg / gdcm"
            ) from exc
        raise VolumeError(
            f"{where}: cannot read pixel data "
            f"({type(exc).__name__}: truncated or inconsistent with "
            "Rows/Columns/Bits Allocated); the file is damaged: re-send the series"
        ) from exc
    if arr.ndim != 2:
        raise VolumeError(
            f"{label}: an image with {arr.ndim}-D pixel data; "
            "only single-frame grey-scale images are supported"
        )
    out = arr.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0:
        with np.errstate(over="ignore", invalid="ignore"):  # inf is refused by the caller
            out = out * np.float32(slope) + np.float32(intercept)
    return out
