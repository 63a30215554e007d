"""Image-level scores: one number per uncertainty map under an aggregator."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.contracts import AGGREGATORS
from uqserve.errors import UsageError
from uqserve.uncertainty.checks import (
    BoolArray,
    FloatArray,
    finite_array,
)

# --------------------------------------------------------------------------- image scores


def _box_sums_2d(x: FloatArray, ph: int, pw: int) -> FloatArray:
    """Sums over all ``ph x pw`` windows of the first two axes of ``x`` (integral image)."""
    c = np.zeros((x.shape[0] + 1, x.shape[1] + 1, *x.shape[2:]), np.float64)
    np.cumsum(x, axis=0, out=c[1:, 1:])
    np.cumsum(c[1:, 1:], axis=1, out=c[1:, 1:])
    return c[ph:, pw:] - c[:-ph, pw:] - c[ph:, :-pw] + c[:-ph, :-pw]


def _dilate(mask: BoolArray, radius: int) -> BoolArray:
    """Binary dilation with a (2r+1)^d box: every voxel within ``radius`` along each axis."""
    out = mask.copy()
    for ax in range(mask.ndim):
        src = out.copy()
        n = mask.shape[ax]
        for shift in range(1, min(radius, n - 1) + 1):
            lo = [slice(None)] * mask.ndim
            hi = [slice(None)] * mask.ndim
            lo[ax], hi[ax] = slice(0, n - shift), slice(shift, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _label_changes(seg: npt.NDArray[np.integer[Any]]) -> int:
    """Number of neighbouring voxel pairs with different labels, summed over every axis."""
    total = 0
    for ax in range(seg.ndim):
        if seg.shape[ax] > 1:
            head = (slice(None),) * ax
            total += int(np.count_nonzero(seg[(*head, slice(1, None))] != seg[(*head, slice(-1))]))
    return total


def image_score(
    u_map: npt.ArrayLike,
    aggregator: str,
    *,
    seg: npt.ArrayLike | None = None,
    member_foreground: npt.ArrayLike | None = None,
    threshold: float | None = None,
    patch_size: int = 10,
) -> float:
    """Aggregate an uncertainty map ``[*sp]`` into one image-level score.

    Aggregators:

    * ``border``: sum of the map / number of label changes between neighbouring
      voxels of ``seg`` along each axis; the plain sum if ``seg`` has no border.
    * ``mean``: mean over all voxels.
    * ``patch``: maximum over all ``patch_size x patch_size`` windows of the
      summed map. 2-D maps: the window runs over both axes; 3-D maps: over the
      first two axes for each index of the last (through-plane) axis. A window
      larger than the map is clipped to the map.
    * ``threshold``: mean of the voxels at or above ``threshold`` (0 if none).
    * ``foreground``: mean over ``member_foreground`` dilated by 2 voxels (a
      5^d box); the whole image if that mask is empty.

    Several maps of one scan: :class:`ImageScorer` computes what depends on
    ``seg`` and ``member_foreground`` once.

    Raises:
        ValueError: unknown aggregator, missing or mis-shaped ``seg`` /
            ``member_foreground`` / ``threshold``, non-finite map.
    """
    scorer = ImageScorer(seg=seg, member_foreground=member_foreground, patch_size=patch_size)
    return scorer.score(u_map, aggregator, threshold=threshold)


class ImageScorer:
    """:func:`image_score` for several maps of one scan, sharing the label-derived parts
    (the border's label changes, the dilated foreground), each computed on first use."""

    def __init__(
        self,
        *,
        seg: npt.ArrayLike | None = None,
        member_foreground: npt.ArrayLike | None = None,
        patch_size: int = 10,
    ) -> None:
        if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1:
            raise UsageError(
                f"image_score: patch_size must be a positive integer, got {patch_size}"
            )
        self.seg = None if seg is None else np.asarray(seg)
        self.member_foreground = (
            None if member_foreground is None else np.asarray(member_foreground, dtype=bool)
        )
        self.patch_size = int(patch_size)
        self._changes: int | None = None
        self._region: BoolArray | None = None

    def score(self, u_map: npt.ArrayLike, aggregator: str, threshold: float | None = None) -> float:
        """The image-level score of ``u_map`` ``[*sp]`` under ``aggregator``."""
        if aggregator not in AGGREGATORS:
            raise UsageError(
                f"image_score: unknown aggregator {aggregator!r}; "
                f"choose one of {', '.join(AGGREGATORS)}"
            )
        u = finite_array(u_map, "image_score(u_map)")
        if u.size == 0:
            raise UsageError("image_score(u_map): empty map")
        if aggregator == "mean":
            return float(u.mean(dtype=np.float64))
        if aggregator == "border":
            total = float(u.sum(dtype=np.float64))
            changes = self._label_changes(u.shape)
            return total / changes if changes else total
        if aggregator == "patch":
            if u.ndim not in (2, 3):
                raise UsageError(
                    f"image_score: 'patch' needs a 2-D or 3-D map, got shape {u.shape}"
                )
            ph, pw = min(self.patch_size, u.shape[0]), min(self.patch_size, u.shape[1])
            return float(_box_sums_2d(u, ph, pw).max())
        if aggregator == "threshold":
            if threshold is None or not math.isfinite(threshold):
                raise UsageError(
                    "image_score: aggregator 'threshold' needs a finite threshold "
                    "(set on validation data)"
                )
            above = u >= threshold
            n = int(np.count_nonzero(above))
            return float(u[above].sum(dtype=np.float64) / n) if n else 0.0
        region = self._foreground_region(u.shape)  # foreground
        if region is None:
            return float(u.mean(dtype=np.float64))
        return float(u[region].mean(dtype=np.float64))

    def _label_changes(self, shape: tuple[int, ...]) -> int:
        if self.seg is None:
            raise UsageError("image_score: aggregator 'border' needs seg (the predicted labels)")
        if self.seg.shape != shape:
            raise UsageError(f"image_score: seg has shape {self.seg.shape}, map has {shape}")
        if self._changes is None:
            self._changes = _label_changes(self.seg)
        return self._changes

    def _foreground_region(self, shape: tuple[int, ...]) -> BoolArray | None:
        """``member_foreground`` dilated by 2 voxels; None when empty (the whole image)."""
        fg = self.member_foreground
        if fg is None:
            raise UsageError(
                "image_score: aggregator 'foreground' needs member_foreground "
                "(Decomposition.member_foreground)"
            )
        if fg.shape != shape:
            raise UsageError(
                f"image_score: member_foreground has shape {fg.shape}, map has {shape}"
            )
        if self._region is None:
            self._region = _dilate(fg, 2)
        return self._region if self._region.any() else None
