"""The in-memory volume every reader produces and every writer consumes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError


class VolumeError(UsageError):
    """An input volume that cannot be used; the message names the file and the fix.

    Always a permanent failure: reading the same bytes again fails the same way.
    """


class InputTooLargeError(VolumeError):
    """The input holds (or its header claims) more voxels than the limit allows.

    Raised before anything that large is allocated. Permanent: retrying the same
    series cannot help (the sidecar must not retry it); raise the limit with
    ``max_voxels`` or ``$UQSERVE_MAX_VOXELS`` if the scan is genuine.
    """


# 256 Mi voxels (512 x 512 x 1024), 1 GiB as float32; predict needs about 15x that.
DEFAULT_MAX_VOXELS = 1 << 28
MAX_VOXELS_ENV = "UQSERVE_MAX_VOXELS"


def voxel_limit(max_voxels: int | None = None) -> int:
    """``max_voxels``, else ``$UQSERVE_MAX_VOXELS``, else ``DEFAULT_MAX_VOXELS``."""
    if max_voxels is None:
        text = os.environ.get(MAX_VOXELS_ENV, "").strip()
        try:
            max_voxels = int(text) if text else DEFAULT_MAX_VOXELS
        except ValueError:
            raise VolumeError(
                f"${MAX_VOXELS_ENV}={text!r} is not a whole number of voxels; fix or unset it"
            ) from None
    if isinstance(max_voxels, bool) or int(max_voxels) < 1:
        raise VolumeError(f"max_voxels must be a whole number >= 1, got {max_voxels!r}")
    return int(max_voxels)


def check_voxel_count(label: str, shape: tuple[int, ...], max_voxels: int | None = None) -> None:
    """Raise ``InputTooLargeError`` when ``shape`` has more voxels than the limit."""
    limit = voxel_limit(max_voxels)
    n = 1
    for s in shape:
        n *= int(s)
    if n > limit:
        dims = "x".join(str(int(s)) for s in shape)
        raise InputTooLargeError(
            f"{label}: {dims} = {n:,} voxels is more than the limit of {limit:,}; "
            f"if the scan is genuine raise max_voxels (or ${MAX_VOXELS_ENV})"
        )


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


# Voxel sizes outside these bounds cannot be a scan (10 m, a nanometre): refused.
SPACING_LIMITS_MM = (1e-6, 1e4)
# Outside these, the header is probably wrong (units, scaling): predicted, with a warning.
SPACING_USUAL_MM = (1e-3, 100.0)
# |intensity| above this is no CT, MR or PET value: a wrong scale factor, most likely.
INTENSITY_USUAL_MAX = 1e9


def geometry_warnings(label: str, affine: npt.NDArray[np.float64]) -> list[str]:
    """Check the voxel sizes of ``affine`` (``[4, 4]``, mm); warnings for odd ones.

    Raises ``VolumeError`` for sizes that no scan has (not finite, <= 1e-6 mm or
    >= 10 m: volumes in mL would be meaningless); returns warnings for sizes
    outside 0.001-100 mm.
    """
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    lo, hi = SPACING_LIMITS_MM
    shown = "x".join(f"{v:.6g}" for v in spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= lo) or np.any(spacing >= hi):
        raise VolumeError(
            f"{label}: voxel size {shown} mm is impossible for a scan (must lie between "
            f"{lo:g} and {hi:g} mm); fix pixdim / Pixel Spacing in the header"
        )
    ulo, uhi = SPACING_USUAL_MM
    if np.any(spacing < ulo) or np.any(spacing > uhi):
        return [
            f"unusual voxel size {shown} mm (outside {ulo:g}-{uhi:g} mm): check the header's "
            "units; volumes in mL depend on it"
        ]
    return []


def intensity_warnings(data: npt.NDArray[np.float32]) -> list[str]:
    """A warning when finite intensities exceed ``INTENSITY_USUAL_MAX`` in magnitude."""
    finite = np.isfinite(data)  # a mask, not a copy of the data
    hi = float(np.max(data, where=finite, initial=-np.inf))
    lo = float(np.min(data, where=finite, initial=np.inf))
    if math.isinf(hi):
        return []  # no finite voxel: sanitize() refuses the volume
    peak = max(abs(hi), abs(lo))
    if peak > INTENSITY_USUAL_MAX:
        return [
            f"intensities up to {peak:.3g} in magnitude: no scanner writes such values; "
            "check the scale factor (scl_slope / Rescale Slope)"
        ]
    return []
