"""Stitching: windows' member outputs -> each member's maps on the model grid.

Used whenever the graphs do not see the scan's own voxels whole (resampled,
reoriented, or cut into windows). Per member ``m`` the stitched ``p̄_m`` and
mean sample entropy are the importance-weighted averages over the windows
covering a voxel, *before* any decomposition, so that TU/AU/EU computed from
them (on the input grid, ``frame.Frame.to_input``) keep their meaning.
Per-sample labels are stitched by taking, at each voxel, the window that
weighs most there; with overlapping windows the per-sample class counts
(for the volume intervals) are counted from those stitched labels.

Memory: ``M x (K + 1)`` float32 maps on the model grid (plus ``M x S`` uint8
labels when needed), whatever the number of windows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Manifest
from uqserve.prediction.accumulate import Clock, ProgressFn, check_outputs
from uqserve.prediction.windows import TilePlan
from uqserve.runtime import MemberOutputs, RuntimeServiceError

__all__ = ["Stitched", "stitch"]


@dataclass
class Stitched:
    """Each member's maps on the model grid, in its array order ``[X', Y', Z']``.

    member_mean     ``[M, K, X', Y', Z']`` float32 p̄_m
    member_entropy  ``[M, X', Y', Z']`` float32 mean sample entropy; None when S = 1
    counts          ``[M, S, K]`` float64 voxels per class in each sample (model grid)
    labels          ``[M, S, X', Y', Z']`` uint8 when asked, else None
    """

    member_mean: npt.NDArray[np.float32]
    member_entropy: npt.NDArray[np.float32] | None
    counts: npt.NDArray[np.float64]
    labels: npt.NDArray[np.uint8] | None
    model_s: float
    accumulate_s: float


class _Sums:
    """Running weighted sums in slice-first order ``[depth, rows, cols]``."""

    def __init__(self, plan: TilePlan, man: Manifest, want_labels: bool) -> None:
        M, S, K = man.num_members, man.num_samples, man.num_classes
        sp = (plan.depth, plan.rows, plan.cols)
        self.mean = np.zeros((M, K, *sp), np.float32)
        self.ent = np.zeros((M, *sp), np.float32) if S > 1 else None
        self.weight = np.zeros(sp, np.float32)
        self.labels = np.zeros((M, S, *sp), np.uint8) if want_labels else None
        self.best = np.full(sp, -1.0, np.float32) if want_labels else None

    def add(
        self, outs: list[MemberOutputs], i: int, where: tuple[Any, ...],
        w: npt.NDArray[np.float32] | None,
    ) -> None:  # fmt: skip
        """Item ``i`` of a batch, covering ``where`` = ``(z, rows slice, cols slice)``."""
        h = where[1].stop - where[1].start
        wd = where[2].stop - where[2].start
        take = self.better(where, w)
        for m, out in enumerate(outs):
            mean = out.mean[i, :, :h, :wd]
            region = (m, slice(None), *where)
            self.mean[region] += mean if w is None else mean * w
            if self.ent is not None:
                ent = out.sample_entropy[i, :h, :wd]
                self.ent[(m, *where)] += ent if w is None else ent * w
            if self.labels is not None:
                if out.sample_labels is None:
                    raise RuntimeServiceError(f"runtime returned no sample_labels for member {m}")
                lab = out.sample_labels[i, :, :h, :wd]
                dst = self.labels[region]
                if take is None:
                    dst[...] = lab
                else:
                    dst[:, take] = lab[:, take]
        self.weight[where] += 1.0 if w is None else w

    def better(
        self, where: tuple[Any, ...], w: npt.NDArray[np.float32] | None
    ) -> npt.NDArray[np.bool_] | None:
        """Where this window outweighs those stitched so far (None: everywhere)."""
        if self.best is None or w is None:
            return None
        take = w > self.best[where]
        self.best[where] = np.where(take, w, self.best[where])
        return take


def stitch(
    results: Iterator[list[MemberOutputs]],
    plan: TilePlan,
    man: Manifest,
    *,
    want_labels: bool,
    progress: ProgressFn | None = None,
    source: str = "",
) -> Stitched:
    """Consume the runtime's results for the windows of ``plan``, in ``plan.tiles()`` order."""
    M, S, K = man.num_members, man.num_samples, man.num_classes
    overlap = plan.per_slice > 1
    sums = _Sums(plan, man, want_labels or overlap)
    counts = np.zeros((M, S, K), np.float64)
    tiles = plan.tiles()
    done = 0
    clock = Clock()
    for outs in clock.batches(results, man):
        t0 = time.perf_counter()
        b = min(plan.batch_size, plan.total - done)
        for m, out in enumerate(outs):
            check_outputs(out, (b, K, plan.tile_h, plan.tile_w), S, m)
            counts[m] += out.sample_counts.sum(axis=0, dtype=np.float64)
        for i in range(b):
            z, y0, x0 = next(tiles)
            h, w = min(plan.tile_h, plan.rows - y0), min(plan.tile_w, plan.cols - x0)
            weights = None if plan.weights is None else plan.weights[:h, :w]
            sums.add(outs, i, (z, slice(y0, y0 + h), slice(x0, x0 + w)), weights)
        done += b
        clock.accumulate_s += time.perf_counter() - t0
        if progress is not None:
            progress(source, done // plan.per_slice, plan.depth)
    if done != plan.total:
        raise RuntimeServiceError(f"runtime returned {done} of {plan.total} windows")
    t0 = time.perf_counter()
    return _finish(sums, plan, counts if not overlap else None, want_labels, clock, t0)


def _finish(
    sums: _Sums, plan: TilePlan, counts: npt.NDArray[np.float64] | None, want_labels: bool,
    clock: Clock, t0: float,
) -> Stitched:  # fmt: skip
    """Divide by the weights; counts from the stitched labels when windows overlapped."""
    np.divide(sums.mean, sums.weight, out=sums.mean)
    if sums.ent is not None:
        np.divide(sums.ent, sums.weight, out=sums.ent)
    if counts is None:
        assert sums.labels is not None
        M, S, K = sums.labels.shape[0], sums.labels.shape[1], sums.mean.shape[1]
        counts = np.zeros((M, S, K), np.float64)
        for m in range(M):
            for s in range(S):
                counts[m, s] = np.bincount(sums.labels[m, s].ravel(), minlength=K)[:K]

    def order(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.moveaxis(a, -3, a.ndim - 3 + plan.axis)

    return Stitched(
        member_mean=order(sums.mean),
        member_entropy=None if sums.ent is None else order(sums.ent),
        counts=counts,
        labels=order(sums.labels) if want_labels and sums.labels is not None else None,
        model_s=clock.model_s,
        accumulate_s=clock.accumulate_s + time.perf_counter() - t0,
    )
