"""Intensity statistics of training data (the bundle's ``fixed`` normalisation)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError


def normalization_stats(
    images: npt.NDArray[np.floating] | Iterable[npt.NDArray[np.floating]],
) -> tuple[float, float]:
    """Mean and standard deviation over every voxel of ``images``.

    ``images`` is one array of any shape (e.g. ``[N, C, H, W]``) or an iterable
    of arrays of different shapes (all voxels pooled). Sums are accumulated in
    float64 around a first-array shift, so the result does not lose precision
    on large sets. Raises ``ValueError`` for empty, non-finite or constant data.
    """
    arrays = (
        [np.asarray(images)] if isinstance(images, np.ndarray) else [np.asarray(a) for a in images]
    )
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise UsageError("normalization_stats: no voxels given")
    shift = float(np.mean(arrays[0], dtype=np.float64))
    n, s1, s2 = 0, 0.0, 0.0
    for a in arrays:
        d = a.astype(np.float64, copy=False) - shift
        if not np.all(np.isfinite(d)):
            raise UsageError("normalization_stats: images contain NaN or infinite values")
        n += d.size
        s1 += float(d.sum())
        s2 += float(np.square(d).sum())
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    std = float(np.sqrt(var))
    if not std > 1e-12:
        raise UsageError("normalization_stats: images are constant; cannot normalise")
    return shift + mean, std
