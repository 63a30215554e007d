"""How the slices of a volume map onto the frames of its DICOM source.

Three layouts (see :class:`uqserve.volumes.dicom.DicomSeries`):

* ``single-frame``: one source image per slice; result frame ``k`` is slice ``k``
  and highdicom references image ``k``.
* ``enhanced``: one multi-frame source; result frame ``f`` is the slice that
  came from source frame ``f + 1``, so highdicom copies each frame's plane
  position and references that frame (Derivation Image / Source Image
  Sequence with Referenced Frame Number).
* ``mosaic``: one single-frame source whose pixel matrix is a grid of tiles;
  results cannot share its rows and columns, so each frame carries its own
  Plane Position computed from the volume's affine (with the orientation and
  pixel measures), and a viewer places every result slice where its tile is.

Array order: ``[X=columns, Y=rows, Z=slices]`` in, highdicom's
``[frames, rows, columns]`` out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

__all__ = ["SourceFrames"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SourceFrames:
    """The slice-to-frame map of one source series.

    layout         ``single-frame``, ``enhanced`` or ``mosaic``
    frame_numbers  ``[Z]`` 1-based source frame (mosaic tile) of each slice; multi-frame only
    affine         ``[4, 4]`` RAS+ affine of the volume; needed for ``mosaic``
    volume_shape   ``(X, Y, Z)`` of the volume; needed for multi-frame layouts
    """

    layout: str = "single-frame"
    frame_numbers: tuple[int, ...] | None = None
    affine: npt.NDArray[np.float64] | None = None
    volume_shape: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, series: Any) -> SourceFrames:
        """The layout of a :class:`~uqserve.volumes.dicom.DicomSeries`."""
        numbers = series.frame_numbers
        x, y, z = (int(v) for v in series.volume.shape)
        return cls(
            layout=str(series.layout),
            frame_numbers=tuple(numbers) if numbers is not None else None,
            affine=np.asarray(series.volume.affine, dtype=np.float64),
            volume_shape=(x, y, z),
        )

    def shape(self, source: Sequence[Dataset]) -> tuple[int, int, int]:
        """The ``[X, Y, Z]`` shape arrays for this source must have."""
        if self.layout == "single-frame" or self.volume_shape is None:
            return int(source[0].Columns), int(source[0].Rows), len(source)
        return self.volume_shape

    def check(self, source: Sequence[Dataset]) -> str | None:
        """Why this layout does not fit ``source``, or ``None``."""
        if self.layout == "single-frame":
            return None
        if len(source) != 1 or self.frame_numbers is None or self.volume_shape is None:
            return f"a {self.layout} source is one image with frame numbers and a volume shape"
        if self.layout == "enhanced":
            n = int(getattr(source[0], "NumberOfFrames", 1) or 1)
            if sorted(self.frame_numbers) != list(range(1, n + 1)):
                return f"the slices must use each of the source's {n} frames once"
        elif self.layout != "mosaic" or self.affine is None:
            return f"unknown layout {self.layout!r} or a mosaic without its affine"
        return None

    def prepare(self, source: Sequence[Dataset]) -> list[Dataset]:
        """The sources as highdicom needs them: for an enhanced image, a copy whose
        shared functional groups hold Pixel Measures and Plane Orientation.

        Scanners may repeat both in every frame instead (Philips does); the reader
        has checked that every frame holds the same values, and highdicom reads
        them from the shared groups only. UIDs, and so every reference, are kept.
        """
        if self.layout != "enhanced":
            return list(source)
        ds = source[0]
        per_frame = ds.PerFrameFunctionalGroupsSequence[0]
        old = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
        shared = Dataset()
        for elem in old:
            shared.add(elem)
        for kw in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
            if kw not in shared and kw in per_frame:
                setattr(shared, kw, per_frame[kw].value)
        copy = Dataset()
        for elem in ds:
            copy.add(elem)
        copy.file_meta = ds.file_meta
        copy.SharedFunctionalGroupsSequence = [shared]
        return [copy]

    def frames(self, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``[X, Y, Z, ...]`` -> ``[frames, rows, cols, ...]`` in the source's frame order."""
        out = np.swapaxes(np.moveaxis(arr, 2, 0), 1, 2)  # [Z, Y=rows, X=cols, ...]
        if self.layout == "enhanced":
            assert self.frame_numbers is not None
            # frame_numbers[k] is slice k's frame: invert the permutation
            out = out[np.argsort(np.asarray(self.frame_numbers))]
        return np.ascontiguousarray(out)

    def geometry(self, depth: int) -> dict[str, Any]:
        """highdicom keyword arguments that give each result frame its own position
        (``mosaic``); empty where the frames follow the source frames."""
        if self.layout != "mosaic":
            return {}
        assert self.affine is not None
        lps = _RAS_TO_LPS @ self.affine
        step_c, step_r = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
        orientation = [*(lps[:3, 0] / step_c), *(lps[:3, 1] / step_r)]
        positions = [
            hd.PlanePositionSequence(
                hd.CoordinateSystemNames.PATIENT, [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
            )
            for k in range(depth)
        ]
        return {
            "plane_positions": positions,
            "plane_orientation": hd.PlaneOrientationSequence(
                hd.CoordinateSystemNames.PATIENT, [float(v) for v in orientation]
            ),
            "pixel_measures": hd.PixelMeasuresSequence(
                pixel_spacing=[float(step_r), float(step_c)],
                slice_thickness=float(np.linalg.norm(lps[:3, 2])),
                spacing_between_slices=float(np.linalg.norm(lps[:3, 2])),
            ),
        }
