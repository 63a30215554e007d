"""Geometry and batching: a volume ``[X, Y, Z]`` <-> batches of padded 2D slices.

This is the one place that knows how voxels reach the graphs and come back:

- the volume is cut into 2D slices along its through-plane axis
  (``Volume.slice_axis``: the last array axis unless the spacing says
  otherwise, see ``uqserve.volumes.nifti.through_plane_axis``); slice ``z`` is
  fed as ``image[:, :, z]`` in the *working order* ``[rows, cols, depth]``
  (through-plane axis last), rows = the first remaining array axis;
- each slice is padded at its far edges (bottom/right) by reflection to
  ``max(tile_size, ceil to multiple)``; ``offset = (z, 0, 0)`` and
  ``valid = (rows, cols)`` tell the graph which pixels are real, so the noise
  of a voxel depends only on its position and the seed, never on the batch;
- outputs are cropped back to ``rows x cols`` and their axes moved back to
  the volume's order.

The bundles with geometry take more steps before and after this one:
``crop.py`` (the nonzero box), ``resample.py`` and ``frame.py`` (reorientation
and resampling to the bundle's spacing, and back), ``windows.py`` (sliding
windows over slices larger than the patch) and ``stitch.py`` (windows back
into whole maps).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Manifest
from uqserve.prediction.intensity import Intensity
from uqserve.runtime import Batch
from uqserve.volumes import Volume

__all__ = ["SAMPLE_BUDGET", "SlicePlan", "iter_batches", "plan_slices", "to_volume_order"]

# Elements of one [B, S, K, H, W] sample tensor per call (32 MiB of float32).
SAMPLE_BUDGET = 1 << 23


@dataclass(frozen=True)
class SlicePlan:
    """How one volume is cut into graph inputs.

    axis        the volume's through-plane axis (0, 1 or 2)
    rows, cols  the size of one slice, voxels
    depth       the number of slices
    pad_h, pad_w  the graph input size after padding, pixels
    batch_size  slices per runtime call
    """

    axis: int
    rows: int
    cols: int
    depth: int
    pad_h: int
    pad_w: int
    batch_size: int

    def working(self, data: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``data`` ``[X, Y, Z]`` in the working order ``[rows, cols, depth]``: a view."""
        return np.moveaxis(data, self.axis, -1)


def plan_slices(volume: Volume, man: Manifest, batch_size: int) -> SlicePlan:
    """The slice plan of ``volume`` for ``man``'s graphs; ``batch_size`` is capped.

    The member graphs hold ``[B, S, K, H, W]`` sample tensors: ``B`` is capped
    so that their size, and with it peak memory, stays under ``SAMPLE_BUDGET``
    elements whatever ``S`` (results do not depend on ``B``).
    """
    axis = int(volume.slice_axis)
    rows, cols, depth = (int(s) for s in np.moveaxis(volume.data, axis, -1).shape)
    tile_h, tile_w = man.input.tile_size
    mult = max(1, man.input.multiple)
    pad_h = max(tile_h, math.ceil(rows / mult) * mult)
    pad_w = max(tile_w, math.ceil(cols / mult) * mult)
    per_slice = man.num_samples * man.num_classes * pad_h * pad_w
    batch_size = min(batch_size, max(1, SAMPLE_BUDGET // per_slice))
    return SlicePlan(axis, rows, cols, depth, pad_h, pad_w, batch_size)


def iter_batches(
    work: npt.NDArray[Any], plan: SlicePlan, intensity: Intensity, seed: int
) -> Iterator[Batch]:
    """Batches of normalised, padded slices of ``work`` ``[rows, cols, depth]``, in order.

    Each ``Batch.image`` is ``[b, 1, pad_h, pad_w]`` float32; the last batch
    may hold fewer than ``plan.batch_size`` slices.
    """
    rows, cols, depth = plan.rows, plan.cols, plan.depth
    for z0 in range(0, depth, plan.batch_size):
        z1 = min(depth, z0 + plan.batch_size)
        b = z1 - z0
        sl = np.transpose(work[:, :, z0:z1], (2, 0, 1)).astype(np.float32)  # [b, X, Y]
        intensity.apply(sl)
        sl = np.pad(sl, ((0, 0), (0, plan.pad_h - rows), (0, plan.pad_w - cols)), mode="reflect")
        yield Batch(
            image=sl[:, np.newaxis],
            seed=np.full(b, seed, np.int64),
            offset=np.stack(
                [np.arange(z0, z1), np.zeros(b, np.int64), np.zeros(b, np.int64)], axis=1
            ).astype(np.int64),
            valid=np.tile(np.array([[rows, cols]], np.int64), (b, 1)),
        )


def to_volume_order(a: npt.NDArray[Any], axis: int) -> npt.NDArray[Any]:
    """``[..., rows, cols, depth]`` (working order) -> ``[..., X, Y, Z]`` (the volume's).

    Leading axes (classes, members, samples) stay in front; a view, no copy.
    """
    return np.moveaxis(a, -1, a.ndim - 3 + axis) if axis != 2 else a
