"""Intensities: non-finite voxels out, then the bundle's normalisation.

The graph input is ``(clip(x) - shift) * scale`` in float32, with
``shift``/``scale``/``clip`` from ``manifest.input.normalization``: fixed
numbers from training (``fixed``, and ``ct`` with the dataset's percentiles
as ``clip``), or the scan's own mean/std for ``zscore``. With ``nonzero``
(z-score inside the nonzero mask, nnU-Net's ``use_mask_for_norm``) the mean
and std are measured inside the mask (nonzero voxels, holes filled) and the
voxels outside it are set to 0; such scans, and scans that are reoriented or
resampled, are normalised whole (``normalize_volume``) before geometry moves
their voxels, as nnU-Net's preprocessing does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Manifest
from uqserve.volumes import Volume, VolumeError, sanitize

__all__ = [
    "INPUT_LIMIT",
    "Intensity",
    "bounded_warning",
    "clean",
    "nonzero_mask",
    "normalization",
    "normalize_volume",
]


# Graph inputs are bounded to +-INPUT_LIMIT: normalised scans lie within +-100, and a
# larger input (one voxel of 3e38) would only overflow inside the network.
INPUT_LIMIT = 1e6


@dataclass(frozen=True)
class Intensity:
    """``(shift, scale, clip)``: the graph input is ``(clip(x) - shift) * scale``.

    ``shift64``/``scale64`` keep the float64 values for slabs whose float32
    arithmetic overflows. ``bounded`` counts the voxels limited to ``INPUT_LIMIT``.
    """

    shift: np.float32
    scale: np.float32
    clip: tuple[float, float] | None
    shift64: float = 0.0
    scale64: float = 1.0
    bounded: list[int] = field(default_factory=lambda: [0])

    def apply(self, slab: npt.NDArray[np.float32]) -> None:
        """Normalise a float32 slab in place (any shape), bounded to +-``INPUT_LIMIT``."""
        if self.clip is not None:
            np.clip(slab, self.clip[0], self.clip[1], out=slab)
        raw = slab.copy() if _extreme(slab) else None
        with np.errstate(over="ignore"):
            slab -= self.shift
            slab *= self.scale
        if raw is not None:
            # float32 may overflow to inf here (x - shift beyond 3.4e38): redo in float64.
            exact = (raw.astype(np.float64) - self.shift64) * self.scale64
            self.bounded[0] += int(np.count_nonzero(np.abs(exact) > INPUT_LIMIT))
            slab[...] = np.clip(exact, -INPUT_LIMIT, INPUT_LIMIT)


def clean(volume: Volume, warnings: list[str]) -> tuple[Volume, int]:
    """``(volume, n_bad)``: non-finite voxels replaced by the minimum finite value.

    Refuses volumes that are not ``[X, Y, Z]`` or hold no finite voxel
    (``VolumeError``); appends a warning when voxels were replaced.
    """
    if volume.data.ndim != 3:
        raise VolumeError(
            f"{volume.source}: volume data must be [X, Y, Z], got {volume.data.shape}"
        )
    volume, n_bad = sanitize(volume)
    if n_bad:
        warnings.append(f"{n_bad} non-finite voxels (NaN/Inf) replaced by the minimum finite value")
    return volume, n_bad


def normalization(
    work: npt.NDArray[np.float32], man: Manifest, warnings: list[str], source: str
) -> Intensity:
    """The bundle's normalisation for this scan (``work``: the volume, any axis order)."""
    norm = man.input.normalization
    clip = (float(norm.clip[0]), float(norm.clip[1])) if norm.clip is not None else None
    measured = work
    if norm.scheme == "zscore" and norm.nonzero:
        mask = nonzero_mask(work)
        if mask.any():
            measured = work[mask]
        else:
            warnings.append(f"{source}: no nonzero voxel; z-score measured over the whole scan")
    shift, scale = norm.shift_scale(None if norm.scheme != "zscore" else measured)
    if norm.scheme == "zscore" and scale == 1.0 and float(np.ptp(measured)) == 0.0:
        warnings.append(f"{source}: constant intensity; z-score normalisation used std 1")
    return Intensity(np.float32(shift), np.float32(scale), clip, shift, scale)


def _extreme(slab: npt.NDArray[np.float32]) -> bool:
    """Whether a slab may leave the float32 range or ``INPUT_LIMIT`` once normalised.

    A cheap test (two reductions) that is false for every ordinary scan, so that
    those keep the float32 arithmetic bit for bit.
    """
    if slab.size == 0:
        return False
    return bool(max(abs(float(slab.max())), abs(float(slab.min()))) > _EXTREME)


# Beyond this magnitude the float32 path is not trusted (x - shift, times scale).
_EXTREME = 1e15


def bounded_warning(intensity: Intensity) -> list[str]:
    """The report warning for voxels whose normalised value was limited, if any."""
    n = intensity.bounded[0]
    if not n:
        return []
    return [
        f"{n} voxels normalised beyond +-{INPUT_LIMIT:g} were limited to it "
        "(extreme intensities: check the scan's scale factor)"
    ]


def nonzero_mask(data: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """``data != 0`` with holes filled (nnU-Net's ``create_nonzero_mask``), any shape."""
    from scipy.ndimage import binary_fill_holes

    mask: npt.NDArray[np.bool_] = binary_fill_holes(data != 0)
    return mask


def normalize_volume(
    data: npt.NDArray[np.float32], man: Manifest, warnings: list[str], source: str
) -> npt.NDArray[np.float32]:
    """The whole volume normalised (a float32 copy, same shape)."""
    intensity = normalization(data, man, warnings, source)
    out = np.array(data, dtype=np.float32)
    intensity.apply(out)
    warnings.extend(bounded_warning(intensity))
    norm = man.input.normalization
    if norm.scheme == "zscore" and norm.nonzero:
        out[~nonzero_mask(data)] = 0.0
    return out
