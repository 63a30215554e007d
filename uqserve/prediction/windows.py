"""Sliding windows: slices on the model grid -> batches of patch-sized graph inputs.

As nnU-Net's predictor: a slice smaller than the patch is padded up to it
(reflection at the far edges); a larger one is covered by windows whose
starts follow nnU-Net's step rule (the fewest windows with step <= overlap
fraction of the patch, spread evenly, the last flush with the edge). Each
window's outputs are weighted by a Gaussian importance map (sigma = patch / 8
per axis, peak 1, no zeros) when stitched, so the centre of a window, where
the network saw most context, counts most.

Without a ``patch`` in the manifest, each whole slice is one window of weight
1 (padded as today's ``geometry.plan_slices``). The graph input of a window
at ``(z, y0, x0)`` has ``offset = (z, y0, x0)`` and ``valid`` = its real
pixels: the in-graph noise hashes global voxel positions, so a voxel gets the
same noise whichever window or batch computes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Manifest
from uqserve.prediction.geometry import SAMPLE_BUDGET
from uqserve.runtime import Batch

__all__ = ["DEFAULT_OVERLAP", "TilePlan", "gaussian_weights", "iter_tiles", "plan_tiles", "starts"]

#: Fraction of the patch that neighbouring windows share (nnU-Net's tile_step_size 0.5).
DEFAULT_OVERLAP = 0.5


def starts(size: int, patch: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Window starts along one axis of ``size`` voxels (nnU-Net's ``compute_steps``)."""
    if size <= patch:
        return [0]
    step = patch * (1.0 - overlap)
    n = math.ceil((size - patch) / step) + 1
    actual = (size - patch) / (n - 1)
    return [round(actual * i) for i in range(n)]


def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = 1 / 8) -> npt.NDArray[np.float32]:
    """Importance map ``patch``-shaped: a Gaussian centred on the window, peak 1, no zeros."""
    w = np.ones((), np.float64)
    for n in patch:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        g = np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2)
        w = np.multiply.outer(w, g)
    w /= w.max()
    w[w == 0] = w[w > 0].min()
    return w.astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """How the model-grid slices are cut into graph inputs.

    axis, rows, cols, depth  as ``geometry.SlicePlan`` (working order [rows, cols, depth])
    tile_h, tile_w  the graph input size, pixels
    ys, xs          window starts along rows and cols
    weights         ``[tile_h, tile_w]`` importance map, None: whole slices (weight 1)
    batch_size      windows per runtime call
    """

    axis: int
    rows: int
    cols: int
    depth: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    weights: npt.NDArray[np.float32] | None
    batch_size: int

    @property
    def per_slice(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def total(self) -> int:
        return self.per_slice * self.depth

    def working(self, data: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``[X, Y, Z]`` -> ``[rows, cols, depth]`` (a view)."""
        return np.moveaxis(data, self.axis, -1)

    def tiles(self) -> Iterator[tuple[int, int, int]]:
        """``(z, y0, x0)`` of every window, slice by slice."""
        for z in range(self.depth):
            for y0, x0 in product(self.ys, self.xs):
                yield z, y0, x0


def plan_tiles(
    shape: tuple[int, ...], axis: int, man: Manifest, batch_size: int, overlap: float
) -> TilePlan:
    """The window plan of a model-grid volume ``shape`` sliced along ``axis``."""
    rows, cols = (int(shape[a]) for a in range(3) if a != axis)
    depth = int(shape[axis])
    patch = man.input.patch
    if patch is None:
        mult = max(1, man.input.multiple)
        tile_h = max(man.input.tile_size[0], math.ceil(rows / mult) * mult)
        tile_w = max(man.input.tile_size[1], math.ceil(cols / mult) * mult)
        ys: tuple[int, ...] = (0,)
        xs: tuple[int, ...] = (0,)
        weights = None
    else:
        tile_h, tile_w = int(patch[-2]), int(patch[-1])
        ys, xs = tuple(starts(rows, tile_h, overlap)), tuple(starts(cols, tile_w, overlap))
        weights = gaussian_weights((tile_h, tile_w))
    per_tile = man.num_samples * man.num_classes * tile_h * tile_w
    batch_size = min(batch_size, max(1, SAMPLE_BUDGET // per_tile))
    return TilePlan(axis, rows, cols, depth, tile_h, tile_w, ys, xs, weights, batch_size)


def iter_tiles(work: npt.NDArray[np.float32], plan: TilePlan, seed: int) -> Iterator[Batch]:
    """Batches of windows of the normalised ``work`` ``[rows, cols, depth]``, in ``tiles()`` order.

    Each slice is padded (reflection, far edges) to at least one window; each
    ``Batch.image`` is ``[b, 1, tile_h, tile_w]`` float32.
    """
    rows, cols = plan.rows, plan.cols
    pad = ((0, max(0, plan.tile_h - rows)), (0, max(0, plan.tile_w - cols)))
    images: list[npt.NDArray[np.float32]] = []
    where: list[tuple[int, int, int]] = []
    padded: npt.NDArray[np.float32] | None = None
    last_z = -1
    for z, y0, x0 in plan.tiles():
        if z != last_z:
            padded = np.pad(work[:, :, z], pad, mode="reflect") if any(pad[0] + pad[1]) else (
                np.asarray(work[:, :, z])
            )  # fmt: skip
            last_z = z
        assert padded is not None
        images.append(padded[y0 : y0 + plan.tile_h, x0 : x0 + plan.tile_w])
        where.append((z, y0, x0))
        if len(images) == plan.batch_size:
            yield _batch(images, where, plan, seed)
            images, where = [], []
    if images:
        yield _batch(images, where, plan, seed)


def _batch(
    images: list[npt.NDArray[np.float32]], where: list[tuple[int, int, int]], plan: TilePlan,
    seed: int,
) -> Batch:  # fmt: skip
    offset = np.array(where, np.int64)
    valid = np.stack(
        [np.minimum(plan.tile_h, plan.rows - offset[:, 1]),
         np.minimum(plan.tile_w, plan.cols - offset[:, 2])], axis=1,
    ).astype(np.int64)  # fmt: skip
    image = np.stack(images).astype(np.float32, copy=False)[:, np.newaxis]
    return Batch(
        image=np.ascontiguousarray(image),
        seed=np.full(len(images), seed, np.int64),
        offset=offset,
        valid=valid,
    )
