"""The model frame: where a scan's voxels go before the graphs, and how maps come back.

``plan_frame`` decides, from the scan's affine and the manifest, the chain
input grid -> reoriented grid (axis permutation/flips) -> model grid
(resampled to ``input.spacing``). ``Frame.to_model`` carries the normalised
image forward; ``Frame.to_input`` carries each member's stitched mean and
mean sample entropy back and decomposes them *on the input grid*, so that
TU = AU + EU holds there exactly and the segmentation is the argmax of the
resampled probabilities.

Axis conventions: for ``dims`` 2, ``input.spacing`` is ``[rows, cols]`` of a
slice, i.e. the two in-plane array axes in increasing order; the slice axis
keeps its spacing. For ``dims`` 3 it is ``[D, H, W]`` = array axes
``(2, 1, 0)`` of the reoriented ``[X, Y, Z]`` array (``z, y, x``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve import uncertainty
from uqserve.bundle import Manifest
from uqserve.prediction.report import FrameInfo
from uqserve.prediction.resample import (
    Ornt,
    axcodes,
    image_orders,
    inverse,
    reorient,
    resample,
    resampled_affine,
    target_shape,
)
from uqserve.volumes import Volume

__all__ = ["Frame", "FrameInfo", "pin_slice_axis", "plan_frame"]


@dataclass(frozen=True)
class Frame:
    """The chain of one scan (shapes ``[X, Y, Z]``, spacings in mm per array axis).

    transform        nibabel ``[3, 2]`` input -> model axes, None: no reorientation
    oriented_shape   the shape after reorientation (before resampling)
    model_shape, model_affine  the grid the graphs see
    slice_axis       the through-plane axis on the model grid (``dims`` 2)
    orders           image interpolation order per axis (0, 1 or 3)
    """

    in_shape: tuple[int, ...]
    in_affine: npt.NDArray[np.float64]
    transform: Ornt | None
    oriented_shape: tuple[int, ...]
    oriented_affine: npt.NDArray[np.float64]
    model_shape: tuple[int, ...]
    model_affine: npt.NDArray[np.float64]
    slice_axis: int
    orders: tuple[int, ...]

    @property
    def identity(self) -> bool:
        """No reorientation and no resampling: voxels reach the graphs as stored."""
        return self.transform is None and self.model_shape == self.oriented_shape

    @property
    def model_voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.model_affine[:3, :3]))) / 1000.0

    def info(self, patch: tuple[int, ...] | None, windows: int) -> FrameInfo:
        def sp(aff: npt.NDArray[np.float64]) -> list[float]:
            return [round(float(v), 6) for v in np.linalg.norm(aff[:3, :3], axis=0)]

        return {
            "input_orientation": axcodes(self.in_affine),
            "input_spacing": sp(self.in_affine),
            "model_orientation": axcodes(self.model_affine),
            "model_spacing": sp(self.model_affine),
            "model_shape": list(self.model_shape),
            "reoriented": self.transform is not None,
            "resampled": self.model_shape != self.oriented_shape,
            "interpolation": list(self.orders),
            "patch": None if patch is None else list(patch),
            "windows": windows,
        }

    def to_model(self, data: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The normalised image ``[X, Y, Z]`` on the model grid (float32)."""
        out = resample(reorient(data, self.transform), self.model_shape, self.orders)
        return np.ascontiguousarray(out, dtype=np.float32)

    def logits_to_input(
        self, member_logits: npt.NDArray[np.float32]
    ) -> tuple[uncertainty.Decomposition, npt.NDArray[np.uint8]]:
        """Decompose on the input grid from softmax members' logits on the model grid.

        member_logits  ``[M, K, X', Y', Z']`` logits (or log-probabilities: up to a
                       per-voxel constant, the same) on the model grid
        The logits are interpolated (linear; nearest along a thick axis, as
        nnU-Net's ``order_z`` 0) and the softmax taken on the input grid, as
        nnU-Net resamples its logits. Returns the decomposition of the members'
        probabilities and nnU-Net's segmentation ``[X, Y, Z]``: the argmax of the
        members' mean log-softmax, i.e. of their mean logits (nnU-Net's fold average).
        """
        M, K = member_logits.shape[:2]
        acc = uncertainty.Accumulator(K, self.in_shape)
        mean_z = np.zeros((K, *self.in_shape), np.float32)
        orders = tuple(0 if o == 0 else 1 for o in self.orders)  # the image's thick axis
        for m in range(M):
            z = _log_softmax(np.stack([self._back(member_logits[m, k], orders) for k in range(K)]))
            mean_z += z
            acc.add(np.exp(z), None)
        return acc.result(release=True), mean_z.argmax(axis=0).astype(np.uint8)

    def labels_to_input(self, labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """``[..., X', Y', Z']`` labels on the model grid -> the input grid (nearest)."""
        lead = labels.shape[:-3]
        flat = labels.reshape(-1, *self.model_shape)
        back = [self._back(a, order=0) for a in flat]
        return np.stack(back).reshape(*lead, *self.in_shape)

    def _back(self, a: npt.NDArray[Any], order: int | tuple[int, ...]) -> npt.NDArray[Any]:
        """One ``[X', Y', Z']`` map from the model grid to the input grid (``order``:
        one for every axis, or one per axis)."""
        orders = (order,) * 3 if isinstance(order, int) else order
        a = resample(a, self.oriented_shape, orders)
        if self.transform is not None:
            a = reorient(a, inverse(self.transform, self.in_shape)[0])
        return a

    def to_input(
        self,
        member_mean: npt.NDArray[np.float32],
        member_entropy: npt.NDArray[np.float32] | None,
    ) -> uncertainty.Decomposition:
        """Decompose on the input grid from each member's maps on the model grid.

        member_mean     ``[M, K, X', Y', Z']`` p̄_m on the model grid
        member_entropy  ``[M, X', Y', Z']`` mean sample entropy, None when S = 1
        Linear interpolation back keeps p̄_m a probability vector and the
        sample entropy below H[p̄_m] (concavity), so the decomposition holds.
        """
        M, K = member_mean.shape[:2]
        acc = uncertainty.Accumulator(K, self.in_shape)
        for m in range(M):
            resampled = self.model_shape != self.oriented_shape
            pm = np.empty((K, *self.in_shape), np.float32)
            for k in range(K - 1 if resampled else K):
                pm[k] = self._back(member_mean[m, k], order=1)
            if resampled:
                # The weights sum to 1: the last class is what the others leave (one
                # resample less); without resampling the maps are only moved, exactly.
                np.subtract(1.0, pm[: K - 1].sum(axis=0), out=pm[K - 1])
                np.maximum(pm[K - 1], 0.0, out=pm[K - 1])
            hs = None if member_entropy is None else self._back(member_entropy[m], order=1)
            acc.add(pm, hs)
        return acc.result(release=True)


def _log_softmax(z: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Log-softmax over axis 0 of ``[K, ...]``, in place."""
    z -= z.max(axis=0)
    z -= np.log(np.exp(z).sum(axis=0))
    return z


def pin_slice_axis(volume: Volume, man: Manifest) -> Volume:
    """``volume`` cut along ``input.slice_axis`` when a 2D bundle pins it; else as read."""
    axis = man.input.slice_axis
    if man.input.dims != 2 or axis is None:
        return volume
    if man.input.orientation is not None:
        from uqserve.prediction.resample import orientation_transform

        t = orientation_transform(volume.affine, man.input.orientation)
        if t is not None:  # the model's axis -> the stored axis that becomes it
            axis = int(np.flatnonzero(t[:, 0] == axis)[0])
    if axis == volume.slice_axis:
        return volume
    return dataclasses.replace(volume, slice_axis=axis)


def plan_frame(volume: Volume, man: Manifest) -> Frame:
    """The chain of ``volume`` (``[X, Y, Z]``, cleaned) into ``man``'s geometry."""
    inp = man.input
    shape = tuple(int(s) for s in volume.data.shape)
    t = None
    affine = volume.affine
    slice_axis = int(volume.slice_axis)
    if inp.orientation is not None:
        from uqserve.prediction.resample import orientation_transform

        t = orientation_transform(volume.affine, inp.orientation)
    oriented_shape = shape
    if t is not None:
        oriented_shape = tuple(shape[int(np.flatnonzero(t[:, 0] == ax)[0])] for ax in range(3))
        affine = volume.affine @ inverse(t, shape)[1]
        slice_axis = int(t[slice_axis, 0])
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    target = _target_spacing(spacing, inp.spacing, inp.dims, slice_axis)
    model_shape = target_shape(oriented_shape, spacing, target)
    orders = image_orders(spacing, target, 3 if inp.interpolation == "cubic" else 1)
    return Frame(
        in_shape=shape, in_affine=volume.affine, transform=t,
        oriented_shape=oriented_shape, oriented_affine=affine, model_shape=model_shape,
        model_affine=resampled_affine(affine, oriented_shape, model_shape),
        slice_axis=slice_axis, orders=orders,
    )  # fmt: skip


def _target_spacing(
    spacing: tuple[float, ...], want: tuple[float, ...] | None, dims: int, slice_axis: int
) -> tuple[float, ...]:
    """The model spacing per array axis of the reoriented ``[X, Y, Z]``."""
    if want is None:
        return spacing
    if dims == 3:
        return (want[2], want[1], want[0])
    out = list(spacing)
    for ax, s in zip([a for a in range(3) if a != slice_axis], want, strict=True):
        out[ax] = s
    return tuple(out)
