"""Crop a scan to its nonzero bounding box, and put the maps back (``input.crop_nonzero``).

nnU-Net crops every case to the bounding box of its nonzero voxels (any
channel) before normalisation and resampling, and predicts only there; the
cropped-away region is background with probability 1. Bundles exported from
nnU-Net set ``input.crop_nonzero`` so uqserve does the same: the crop changes
z-score statistics, the resampled grid and the sliding windows, so parity
needs it. Outside the box every uncertainty is 0 and no member sees
foreground.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from uqserve import uncertainty
from uqserve.bundle import Manifest
from uqserve.volumes import Volume

__all__ = ["Crop", "plan_crop"]

_G = TypeVar("_G", bound=np.generic)


@dataclass(frozen=True)
class Crop:
    """The box ``[start, stop)`` per array axis of the input ``[X, Y, Z]`` grid."""

    in_shape: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        a, b = self.start, self.stop
        return slice(a[0], b[0]), slice(a[1], b[1]), slice(a[2], b[2])

    @property
    def outside_voxels(self) -> int:
        inside = int(np.prod([b - a for a, b in zip(self.start, self.stop, strict=True)]))
        return int(np.prod(self.in_shape)) - inside

    def info(self) -> dict[str, list[int]]:
        """report.json's ``geometry.crop``: the box on the input grid."""
        return {"start": list(self.start), "stop": list(self.stop)}

    def volume(self, volume: Volume) -> Volume:
        """The cropped scan; its affine maps the box's voxels to the same positions."""
        shift = np.eye(4)
        shift[:3, 3] = self.start
        return Volume(
            data=np.ascontiguousarray(volume.data[self.slices]),
            affine=volume.affine @ shift,
            source=volume.source,
            header=volume.header,
            slice_axis=volume.slice_axis,
            meta=volume.meta,
        )

    def restore(self, dec: uncertainty.Decomposition) -> uncertainty.Decomposition:
        """Maps ``[..., X', Y', Z']`` of the box -> the input grid (outside: background, 0)."""
        pad = self.pad
        mean = pad(dec.mean)
        outside = np.ones(self.in_shape, bool)
        outside[self.slices] = False
        mean[0][outside] = 1.0
        fg = dec.member_foreground
        return uncertainty.Decomposition(
            mean=mean,
            tu=pad(dec.tu),
            au=pad(dec.au),
            eu=pad(dec.eu),
            au_sample=pad(dec.au_sample),
            au_latent=pad(dec.au_latent),
            member_foreground=None if fg is None else pad(fg),
            num_members=dec.num_members,
        )

    def pad(self, a: npt.NDArray[_G]) -> npt.NDArray[_G]:
        """``[..., X', Y', Z']`` of the box -> the input grid, zeros (background) outside."""
        out = np.zeros((*a.shape[:-3], *self.in_shape), a.dtype)
        out[(..., *self.slices)] = a
        return out


def plan_crop(volume: Volume, man: Manifest) -> Crop | None:
    """The nonzero bounding box of ``volume`` when ``man.input.crop_nonzero``; else None.

    None too when there is nothing to crop (the box is the whole scan) or
    nothing nonzero at all (nnU-Net then keeps the whole scan as well).
    """
    if not man.input.crop_nonzero:
        return None
    shape = tuple(int(s) for s in volume.data.shape)
    nonzero = volume.data != 0
    if not nonzero.any():
        return None
    start, stop = [], []
    for ax in range(3):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != ax)))
        start.append(int(hit[0]))
        stop.append(int(hit[-1]) + 1)
    if start == [0, 0, 0] and tuple(stop) == shape:
        return None
    return Crop(in_shape=shape, start=tuple(start), stop=tuple(stop))  # type: ignore[arg-type]
