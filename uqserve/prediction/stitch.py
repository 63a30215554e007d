"""Stitching: windows' member outputs -> each member's maps on the model grid.

Used whenever the graphs do not see the scan's own voxels whole (resampled,
reoriented, or cut into windows). Per member ``m`` the stitched ``p̄_m`` and
mean sample entropy are the importance-weighted averages over the windows
covering a voxel, *before* any decomposition, so that TU/AU/EU computed from
them (on the input grid, ``frame.Frame.to_input``) keep their meaning.
Per-sample labels are stitched by taking, at each voxel, the window that
weighs most there; with overlapping windows the per-sample class counts
(for the volume intervals) are counted from those stitched labels.

With ``input.blend`` ``logits`` (softmax members, S = 1) each member's
*log-probabilities* are blended instead: a window's ``log p_m`` is its
logits minus a per-voxel constant, so ``softmax(sum_w w log p / sum_w w)``
is nnU-Net's ``softmax(sum_w w z / sum_w w)`` exactly. The member's label
is then the argmax of its blended map, and its counts are counted from it.

Memory: ``M x (K + 1)`` float32 maps on the model grid (plus ``M x S`` uint8
labels when needed), whatever the number of windows: ``4 M K + 4`` bytes per
voxel, plus ``M S`` for labels (nnU-Net's float16 weight sums: ``4 M K + 2``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Manifest
from uqserve.prediction.accumulate import Clock, ProgressFn, check_member_values, check_outputs
from uqserve.prediction.windows import TilePlan
from uqserve.runtime import MemberOutputs, RuntimeServiceError

__all__ = ["Stitched", "recount", "stitch"]


@dataclass
class Stitched:
    """Each member's maps on the model grid, in its array order ``[X', Y', Z']``.

    member_mean     ``[M, K, X', Y', Z']`` float32 p̄_m; with ``logits``, each
                    member's blended log-probabilities (softmax them for p̄_m)
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
    logits: bool = False


#: The smallest positive float32: where a window's probability underflowed to 0.
_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


_Box = tuple[slice, slice, slice]


class _Sums:
    """Running weighted sums over the grid ``[D, H, W]`` (``TilePlan`` order)."""

    def __init__(self, plan: TilePlan, man: Manifest, want_labels: bool) -> None:
        M, S, K = man.num_members, man.num_samples, man.num_classes
        sp = plan.grid
        self.mean: npt.NDArray[Any] = np.zeros((M, K, *sp), np.float32)
        self.ent = np.zeros((M, *sp), np.float32) if S > 1 else None
        # nnU-Net sums its float16 weights in float16 (n_predictions): so do we, exactly.
        wtype = plan.weights.dtype if plan.weights is not None else np.float32
        self.weight: npt.NDArray[Any] = np.zeros(sp, wtype)
        self.logits = man.input.blend == "logits"
        want_labels = want_labels and not self.logits  # labels: the blended argmax
        self.labels = np.zeros((M, S, *sp), np.uint8) if want_labels else None
        self.best = np.full(sp, -1.0, np.float32) if want_labels else None
        self.true_logits = False

    def given_logits(self) -> None:
        """The runtime returns the graphs' logits: blend those, not log-probabilities;
        with nnU-Net's float16 weights, in float16 as nnU-Net's ``predicted_logits``."""
        self.true_logits = True
        if self.weight.dtype == np.float16:
            self.mean = self.mean.astype(np.float16)

    def add(
        self, outs: list[_Slab], i: int, where: _Box, crop: _Box,
        w: npt.NDArray[np.float32] | npt.NDArray[np.float16] | None,
    ) -> None:  # fmt: skip
        """Item ``i`` of a batch (outputs with a D axis): its ``crop`` covers ``where``."""
        take = self._better(where, w)
        for m, (mean, ent, labels) in enumerate(outs):
            pm = mean[i][(slice(None), *crop)]
            if self.logits and not self.true_logits:
                pm = np.log(np.maximum(pm, _TINY))  # logits - logsumexp
            region = (m, slice(None), *where)
            self.mean[region] += pm if w is None else pm * w
            if self.ent is not None:
                e = ent[i][crop]
                self.ent[(m, *where)] += e if w is None else e * w
            if self.labels is not None:
                if labels is None:
                    raise RuntimeServiceError(f"runtime returned no sample_labels for member {m}")
                lab = labels[i][(slice(None), *crop)]
                dst = self.labels[region]
                if take is None:
                    dst[...] = lab
                else:
                    dst[:, take] = lab[:, take]
        self.weight[where] += 1.0 if w is None else w

    def _better(
        self, where: _Box, w: npt.NDArray[np.float32] | npt.NDArray[np.float16] | None
    ) -> npt.NDArray[np.bool_] | None:
        """Where this window outweighs those stitched so far (None: everywhere)."""
        if self.best is None or w is None:
            return None
        take = w > self.best[where]
        self.best[where] = np.where(take, w, self.best[where])
        return take


#: One member's batch outputs with a D axis: mean [b, K, d, h, w], entropy [b, d, h, w],
#: labels [b, S, d, h, w] or None.
_Slab = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.uint8] | None]


def _slabs(out: MemberOutputs, dims: int, logits: bool) -> _Slab:
    """A member's outputs with a D axis (slices get one of size 1; views);
    ``logits``: its logits in place of its mean."""
    mean = out.logits if logits and out.logits is not None else out.mean
    if dims == 3:
        return mean, out.sample_entropy, out.sample_labels
    lab = out.sample_labels
    return (
        mean[:, :, np.newaxis],
        out.sample_entropy[:, np.newaxis],
        None if lab is None else lab[:, :, np.newaxis],
    )


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
    sums = _Sums(plan, man, want_labels or recount(plan))
    counts = np.zeros((M, S, K), np.float64)
    tiles = plan.tiles()
    graph_window = plan.window[1:] if plan.dims == 2 else plan.window
    done = 0
    clock = Clock()
    for outs in clock.batches(results, man):
        t0 = time.perf_counter()
        b = min(plan.batch_size, plan.total - done)
        for m, out in enumerate(outs):
            check_outputs(out, (b, K, *graph_window), S, m)
            check_member_values(out, man, m)
            counts[m] += out.sample_counts.sum(axis=0, dtype=np.float64)
        if sums.logits and not done and all(out.logits is not None for out in outs):
            sums.given_logits()
        slabs = [_slabs(out, plan.dims, sums.true_logits) for out in outs]
        for i in range(b):
            where, crop = plan.region(next(tiles))
            weights = None if plan.weights is None else plan.weights[crop]
            sums.add(slabs, i, where, crop, weights)
        done += b
        clock.accumulate_s += time.perf_counter() - t0
        if progress is not None:
            progress(source, done * plan.grid[0] // plan.total, plan.grid[0])
    if done != plan.total:
        raise RuntimeServiceError(f"runtime returned {done} of {plan.total} windows")
    t0 = time.perf_counter()
    return _finish(sums, plan, None if recount(plan) else counts, want_labels, clock, t0)


def recount(plan: TilePlan) -> bool:
    """Whether class counts come from the stitched labels: the graphs' own counts
    (over each window's leading real voxels) miss overlaps and centred padding."""
    return plan.overlapping or any(plan.before)


def _finish(
    sums: _Sums, plan: TilePlan, counts: npt.NDArray[np.float64] | None, want_labels: bool,
    clock: Clock, t0: float,
) -> Stitched:  # fmt: skip
    """Divide by the weights; counts from the stitched labels when windows overlapped."""
    weight = sums.weight.astype(np.float32, copy=False)
    if sums.mean.dtype == np.float16:  # nnU-Net's torch.div of its float16 sums
        sums.mean = np.divide(sums.mean, sums.weight).astype(np.float32)
    else:
        np.divide(sums.mean, weight, out=sums.mean)
    if sums.ent is not None:
        np.divide(sums.ent, weight, out=sums.ent)
    if sums.logits and (want_labels or counts is None):
        sums.labels = sums.mean.argmax(axis=1).astype(np.uint8)[:, np.newaxis]  # [M, 1, ...]
    if counts is None:
        assert sums.labels is not None
        M, S, K = sums.labels.shape[0], sums.labels.shape[1], sums.mean.shape[1]
        counts = np.zeros((M, S, K), np.float64)
        for m in range(M):
            for s in range(S):
                counts[m, s] = np.bincount(sums.labels[m, s].ravel(), minlength=K)[:K]
    return Stitched(
        member_mean=plan.to_model(sums.mean),
        member_entropy=None if sums.ent is None else plan.to_model(sums.ent),
        counts=counts,
        labels=plan.to_model(sums.labels) if want_labels and sums.labels is not None else None,
        model_s=clock.model_s,
        accumulate_s=clock.accumulate_s + time.perf_counter() - t0,
        logits=sums.logits,
    )
