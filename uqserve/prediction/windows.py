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
    """How the model grid is cut into graph inputs, in slice-first order ``[D, H, W]``.

    For ``dims`` 2, ``D`` is the slices (the through-plane ``axis`` of the model
    array) and a window is one slice thick; for ``dims`` 3 ``[D, H, W]`` is the
    model array ``[X', Y', Z']`` reversed (``z, y, x``).

    grid        ``(D, H, W)`` voxels
    window      the graph input ``(d, h, w)`` (``d`` = 1 for slices)
    starts      window starts per axis
    weights     ``window``-shaped importance map, None: whole slices (weight 1)
    batch_size  windows per runtime call
    """

    dims: int
    axis: int
    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    weights: npt.NDArray[np.float32] | None
    batch_size: int

    @property
    def per_slice(self) -> int:
        """Windows per slice (2D), or per volume (3D)."""
        return (
            len(self.starts[1])
            * len(self.starts[2])
            * (len(self.starts[0]) if self.dims == 3 else 1)
        )

    @property
    def total(self) -> int:
        return len(self.starts[0]) * len(self.starts[1]) * len(self.starts[2])

    @property
    def overlapping(self) -> bool:
        return self.total > (self.grid[0] if self.dims == 2 else 1)

    def working(self, data: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The model array ``[X', Y', Z']`` -> ``[D, H, W]`` (a view)."""
        if self.dims == 3:
            return np.moveaxis(data, (0, 1, 2), (2, 1, 0))
        return np.moveaxis(data, self.axis, 0)

    def to_model(self, a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``[..., D, H, W]`` -> the model array order ``[..., X', Y', Z']`` (a view)."""
        n = a.ndim
        if self.dims == 3:
            return np.moveaxis(a, (n - 3, n - 2, n - 1), (n - 1, n - 2, n - 3))
        return np.moveaxis(a, n - 3, n - 3 + self.axis)

    def tiles(self) -> Iterator[tuple[int, int, int]]:
        """``(z0, y0, x0)`` of every window, slice (or slab) by slice."""
        return iter(product(*self.starts))


def plan_tiles(
    shape: tuple[int, ...], axis: int, man: Manifest, batch_size: int, overlap: float
) -> TilePlan:
    """The window plan of a model-grid volume ``shape`` (``[X', Y', Z']``)."""
    inp = man.input
    if inp.dims == 3:
        grid = (int(shape[2]), int(shape[1]), int(shape[0]))
    else:
        d, (r, c) = int(shape[axis]), (int(shape[a]) for a in range(3) if a != axis)
        grid = (d, r, c)
    weights = None
    if inp.patch is None:  # 2D whole slices, padded as geometry.plan_slices
        mult = max(1, inp.multiple)
        window = (
            1,
            max(inp.tile_size[0], math.ceil(grid[1] / mult) * mult),
            max(inp.tile_size[1], math.ceil(grid[2] / mult) * mult),
        )
        starts_ = (tuple(range(grid[0])), (0,), (0,))
    else:
        window = (1, *inp.patch) if inp.dims == 2 else tuple(inp.patch)  # type: ignore[assignment]
        per_axis = [starts(n, p, overlap) for n, p in zip(grid, window, strict=True)]
        if inp.dims == 2:
            per_axis[0] = list(range(grid[0]))
        starts_ = tuple(tuple(v) for v in per_axis)  # type: ignore[assignment]
        weights = gaussian_weights(window[1:] if inp.dims == 2 else window).reshape(window)
    per_tile = man.num_samples * man.num_classes * window[0] * window[1] * window[2]
    batch_size = min(batch_size, max(1, SAMPLE_BUDGET // per_tile))
    return TilePlan(inp.dims, axis, grid, window, starts_, weights, batch_size)


def iter_tiles(work: npt.NDArray[np.float32], plan: TilePlan, seed: int) -> Iterator[Batch]:
    """Batches of windows of the normalised ``work`` ``[D, H, W]``, in ``tiles()`` order.

    ``work`` is padded (reflection, far edges) to at least one window per axis;
    ``Batch.image`` is ``[b, 1, h, w]`` (2D) or ``[b, 1, d, h, w]`` (3D) float32.
    """
    pad = [(0, max(0, n - g)) for n, g in zip(plan.window, plan.grid, strict=True)]
    if plan.dims == 2:
        pad[0] = (0, 0)
    padded = np.pad(work, pad, mode="reflect") if any(p[1] for p in pad) else work
    d, h, w = plan.window
    images: list[npt.NDArray[np.float32]] = []
    where: list[tuple[int, int, int]] = []
    for z0, y0, x0 in plan.tiles():
        crop = padded[z0 : z0 + d, y0 : y0 + h, x0 : x0 + w]
        images.append(crop[0] if plan.dims == 2 else crop)
        where.append((z0, y0, x0))
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
    real = np.minimum(np.array(plan.window), np.array(plan.grid) - offset)  # [b, 3]
    valid = real[:, 1:] if plan.dims == 2 else real
    image = np.stack(images).astype(np.float32, copy=False)[:, np.newaxis]
    return Batch(
        image=np.ascontiguousarray(image),
        seed=np.full(len(images), seed, np.int64),
        offset=offset,
        valid=np.ascontiguousarray(valid, dtype=np.int64),
    )
