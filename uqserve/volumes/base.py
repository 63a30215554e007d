"""The in-memory volume every reader produces and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class VolumeError(ValueError):
    """An input volume that cannot be used; the message names the file and the fix."""


@dataclass
class Volume:
    """A scalar image volume in NIfTI voxel order.

    data    ``[X, Y, Z]`` float32 (voxel axes i, j, k); a 2D image is ``[X, Y, 1]``
    affine  ``[4, 4]`` float64, voxel index -> RAS+ millimetres (NIfTI convention)
    source  file or folder name, for messages (never a patient identifier)
    header  the reader's header (e.g. a nibabel header) to copy onto outputs, or None
    slice_axis  the through-plane axis that predict slices along
    """

    data: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    source: str
    header: Any = None
    slice_axis: int = 2
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0
