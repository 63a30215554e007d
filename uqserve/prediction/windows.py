"""Sliding windows: slices on the model grid -> batches of patch-sized graph inputs.

As nnU-Net's predictor: a slice smaller than the patch is padded up to it
(``input.pad``: reflection at the far edges, or nnU-Net's constant 0 split
evenly before and after); a larger one is covered by windows whose starts
follow nnU-Net's step rule (the fewest windows with step <= overlap fraction
of the patch, spread evenly, the last flush with the edge). Each window's
outputs are weighted by a Gaussian importance map when stitched, so the
centre of a window, where the network saw most context, counts most
(``input.gaussian``: sigma = patch / 8 per axis about the centre, peak 1;
or nnU-Net's own map, float16).

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

from uqserve.bundle import Manifest, Padding
from uqserve.prediction.geometry import SAMPLE_BUDGET
from uqserve.runtime import Batch

__all__ = [
    "DEFAULT_OVERLAP",
    "TilePlan",
    "gaussian_weights",
    "iter_tiles",
    "nnunet_gaussian",
    "plan_tiles",
    "starts",
]

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


def nnunet_gaussian(patch: tuple[int, ...]) -> npt.NDArray[np.float16]:
    """nnU-Net's importance map (``compute_gaussian(patch, 1/8, 10)``), ``patch``-shaped.

    A unit impulse at ``patch // 2`` filtered by scipy's Gaussian (sigma =
    patch / 8, truncated at 4 sigma), scaled to a peak of 10 and rounded to
    float16, as nnU-Net's predictor uses it; zeros (underflow at a 3D window's
    corners) are raised to the smallest weight left.
    """
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch, np.float64)
    impulse[tuple(n // 2 for n in patch)] = 1.0
    g = gaussian_filter(impulse, [n / 8 for n in patch], 0, mode="constant", cval=0)
    g /= g.max() / 10
    h = g.astype(np.float16)
    h[h == 0] = h[h != 0].min()
    return h


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
    before      padding before the image per axis (``input.pad.centre``); window
                starts count from the padded image's first voxel
    """

    dims: int
    axis: int
    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    weights: npt.NDArray[np.float32] | npt.NDArray[np.float16] | None
    batch_size: int
    before: tuple[int, int, int] = (0, 0, 0)

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

    def region(
        self, start: tuple[int, int, int]
    ) -> tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]]:
        """The grid voxels a window at ``start`` (padded coordinates) covers, and
        where they lie in the window: ``(grid slices, window slices)``."""
        grid, window = [], []
        for s, n, g, b in zip(start, self.window, self.grid, self.before, strict=True):
            lo, hi = max(s - b, 0), min(s - b + n, g)
            grid.append(slice(lo, hi))
            window.append(slice(lo - (s - b), hi - (s - b)))
        return (grid[0], grid[1], grid[2]), (window[0], window[1], window[2])

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
        spatial = window[1:] if inp.dims == 2 else window
        weights = (
            nnunet_gaussian(spatial) if inp.gaussian == "nnunet" else gaussian_weights(spatial)
        ).reshape(window)
    per_tile = man.num_samples * man.num_classes * window[0] * window[1] * window[2]
    batch_size = min(batch_size, max(1, SAMPLE_BUDGET // per_tile))
    before = (0, 0, 0)
    if inp.pad.centre:  # nnU-Net's pad_nd_image: half before, the odd voxel after
        lo = [max(0, n - g) // 2 for n, g in zip(window, grid, strict=True)]
        before = (0 if inp.dims == 2 else lo[0], lo[1], lo[2])
    return TilePlan(inp.dims, axis, grid, window, starts_, weights, batch_size, before)


def iter_tiles(
    work: npt.NDArray[np.float32], plan: TilePlan, seed: int, pad: Padding | None = None
) -> Iterator[Batch]:
    """Batches of windows of the normalised ``work`` ``[D, H, W]``, in ``tiles()`` order.

    ``work`` is padded to at least one window per axis as ``pad`` says
    (reflection or a constant; centred as ``plan.before``); ``Batch.image`` is
    ``[b, 1, h, w]`` (2D) or ``[b, 1, d, h, w]`` (3D) float32.
    """
    total = [max(0, n - g) for n, g in zip(plan.window, plan.grid, strict=True)]
    if plan.dims == 2:
        total[0] = 0
    widths = [(b, t - b) for b, t in zip(plan.before, total, strict=True)]
    pad = pad or Padding()
    padded = work
    if any(total) and pad.mode == "constant":
        padded = np.pad(work, widths, mode="constant", constant_values=np.float32(pad.value))
    elif any(total):
        padded = np.pad(work, widths, mode="reflect")
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
    # Global voxel positions (the in-graph noise hashes them); a centred pad's
    # window starts before the image, and its counts are recounted after stitching.
    offset = np.maximum(np.array(where, np.int64) - np.array(plan.before, np.int64), 0)
    real = np.minimum(np.array(plan.window), np.array(plan.grid) - offset)  # [b, 3]
    valid = real[:, 1:] if plan.dims == 2 else real
    image = np.stack(images).astype(np.float32, copy=False)[:, np.newaxis]
    return Batch(
        image=np.ascontiguousarray(image),
        seed=np.full(len(images), seed, np.int64),
        offset=offset,
        valid=np.ascontiguousarray(valid, dtype=np.int64),
    )
