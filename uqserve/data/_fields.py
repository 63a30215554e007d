"""Smooth random fields and soft shapes shared by the generators and the shifts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]


def smooth_field(
    rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float]
) -> FloatArray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation.

    ``sigma`` is in voxels per axis. Wide kernels are applied on a coarser grid
    and upsampled (cubic), which gives the same kind of field at a fraction of
    the cost of filtering at full resolution.
    """
    shape = tuple(int(s) for s in shape)
    # Downsample so that the widest kernel is about 2 voxels on the coarse grid.
    factors = [max(1, int(s // 2)) for s in sigma]
    coarse = tuple(max(4, -(-n // f)) for n, f in zip(shape, factors, strict=True))
    noise = rng.standard_normal(coarse)
    coarse_sigma = [s * c / n for s, c, n in zip(sigma, coarse, shape, strict=True)]
    field = ndimage.gaussian_filter(noise, coarse_sigma, mode="wrap")
    if coarse != shape:
        zoom = [n / c for n, c in zip(shape, coarse, strict=True)]
        field = ndimage.zoom(field, zoom, order=3, mode="grid-wrap", grid_mode=True)
        field = field[tuple(slice(0, n) for n in shape)]
    field = field - field.mean()
    std = float(field.std())
    return (field / std if std > 0 else field).astype(np.float32)


def sigmoid(x: npt.NDArray[np.floating]) -> FloatArray:
    """Numerically safe logistic function."""
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def grid(
    shape: Sequence[int], spacing: Sequence[float], fov: float
) -> list[npt.NDArray[np.float64]]:
    """Voxel-centre coordinates per axis in units of the in-plane field of view.

    Returns one broadcastable array per axis (``sparse`` meshgrid), centred on
    the middle of the grid, so a generator can write shapes in physical units
    that do not depend on the number of voxels.
    """
    axes = [
        ((np.arange(n) + 0.5) * s - n * s / 2.0) / fov for n, s in zip(shape, spacing, strict=True)
    ]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))
