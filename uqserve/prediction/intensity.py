"""Intensities: non-finite voxels out, then the bundle's normalisation.

The graph input is ``(clip(x) - shift) * scale`` in float32, with
``shift``/``scale``/``clip`` from ``manifest.input.normalization``: fixed
numbers from training, or the scan's own mean/std for ``zscore``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Manifest
from uqserve.volumes import Volume, VolumeError, sanitize

__all__ = ["Intensity", "clean", "normalization"]


@dataclass(frozen=True)
class Intensity:
    """``(shift, scale, clip)``: the graph input is ``(clip(x) - shift) * scale``."""

    shift: np.float32
    scale: np.float32
    clip: tuple[float, float] | None

    def apply(self, slab: npt.NDArray[np.float32]) -> None:
        """Normalise a float32 slab in place (any shape)."""
        if self.clip is not None:
            np.clip(slab, self.clip[0], self.clip[1], out=slab)
        slab -= self.shift
        slab *= self.scale


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
    shift, scale = norm.shift_scale(None if norm.scheme == "fixed" else work)
    if norm.scheme == "zscore" and scale == 1.0 and float(np.ptp(work)) == 0.0:
        warnings.append(f"{source}: constant intensity; z-score normalisation used std 1")
    return Intensity(np.float32(shift), np.float32(scale), clip)
