"""Downstream metrics for ``uqserve evaluate`` (docs/concepts/uncertainty.md lists them).

Segmentation quality (Dice, GED², Hungarian-matched IoU), calibration (ECE,
Platt scaling, ACE), ambiguity (NCC, annotator disagreement, Spearman) and
OOD detection (AUROC, FPR at 95 % TPR). numpy and scipy only.

Conventions: label maps are integer arrays, 0 is background; where a metric
compares masks (GED², Hungarian IoU, NCC, annotator disagreement) the mask is
"foreground" = any label != 0. Shapes: ``A`` annotators, ``N`` samples,
``K`` classes, ``*sp`` spatial axes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from uqserve.errors import UsageError
from uqserve.uncertainty import check_probabilities, finite_array, rank_correlation

__all__ = [
    "ace",
    "ambiguity_correlation",
    "annotator_disagreement",
    "auroc",
    "dice",
    "ece",
    "fpr_at_95_tpr",
    "ged2",
    "ged2_paper",
    "hungarian_iou",
    "ncc",
    "platt_confidence",
    "platt_fit",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.integer[Any]]


# --------------------------------------------------------------------------- helpers


def _labels(x: npt.ArrayLike, name: str, min_ndim: int = 1) -> IntArray:
    arr = np.asarray(x)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.isfinite(arr).all() and np.array_equal(arr, np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise UsageError(f"{name}: expected integer label maps, got dtype {arr.dtype}")
    if arr.ndim < min_ndim:
        raise UsageError(f"{name}: expected at least {min_ndim} dimensions, got shape {arr.shape}")
    if arr.size == 0:
        raise UsageError(f"{name}: empty array")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise UsageError(f"{name}: negative labels")
    return arr


def _stack(x: npt.ArrayLike, name: str) -> npt.NDArray[np.bool_]:
    """``[N, *sp]`` label maps -> ``[N, voxels]`` foreground masks."""
    arr = _labels(x, name, min_ndim=2)
    return (arr != 0).reshape(arr.shape[0], -1)


def _pairwise(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_], kind: str) -> FloatArray:
    """IoU or Dice between every row of ``a`` ``[N, V]`` and ``b`` ``[P, V]``; empty-empty = 1."""
    af = a.astype(np.float64)
    bf = b.astype(np.float64)
    inter = af @ bf.T
    na = af.sum(axis=1)[:, None]
    nb = bf.sum(axis=1)[None, :]
    den = na + nb - inter if kind == "iou" else na + nb
    num = inter if kind == "iou" else 2 * inter
    out = np.ones_like(inter)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _same_spatial(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise UsageError(f"{what}: spatial shapes differ: {a.shape[1:]} vs {b.shape[1:]}")


# --------------------------------------------------------------------------- overlap


def dice(pred: npt.ArrayLike, annotations: npt.ArrayLike, num_classes: int) -> FloatArray:
    """Dice per foreground class against each annotator, averaged over annotators.

    Args:
        pred: ``[*sp]`` predicted labels.
        annotations: ``[A, *sp]`` (or ``[*sp]`` for one annotator) labels.
        num_classes: K; classes 1..K-1 are reported.

    Returns:
        ``[K - 1]`` float64; a class absent from both maps scores 1.
    """
    p = _labels(pred, "dice(pred)")
    y = _labels(annotations, "dice(annotations)")
    if y.shape == p.shape:
        y = y[None]
    if y.shape[1:] != p.shape:
        raise UsageError(f"dice: annotations {y.shape} do not match pred {p.shape} ([A, *sp])")
    if num_classes < 2:
        raise UsageError(f"dice: num_classes must be >= 2, got {num_classes}")
    out = np.empty(num_classes - 1, np.float64)
    for k in range(1, num_classes):
        pk = (p == k).reshape(1, -1)
        yk = (y == k).reshape(y.shape[0], -1)
        out[k - 1] = _pairwise(pk, yk, "dice").mean()
    return out


def ged2(samples: npt.ArrayLike, annotations: npt.ArrayLike) -> float:
    """Generalised energy distance GED² with d = 1 - IoU (foreground), one image.

    ``2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` over all pairs (including
    identical ones, as Kohl et al. 2018), IoU(empty, empty) = 1.

    Args:
        samples: ``[N, *sp]`` model samples (label maps).
        annotations: ``[A, *sp]`` annotator label maps.
    """
    s = _stack(samples, "ged2(samples)")
    y = _stack(annotations, "ged2(annotations)")
    _same_spatial(np.asarray(samples), np.asarray(annotations), "ged2")
    d_sy = 1 - _pairwise(s, y, "iou")
    d_ss = 1 - _pairwise(s, s, "iou")
    d_yy = 1 - _pairwise(y, y, "iou")
    return float(2 * d_sy.mean() - d_ss.mean() - d_yy.mean())


def ged2_paper(samples: npt.ArrayLike, annotations: npt.ArrayLike) -> float:
    """The paper's GED² variant: d = 1 - Dice, within each member's samples, member-averaged.

    Args:
        samples: ``[M, S, *sp]`` label maps of sample s of member m.
        annotations: ``[A, *sp]`` annotator label maps.
    """
    arr = _labels(samples, "ged2_paper(samples)", min_ndim=3)
    y = _stack(annotations, "ged2_paper(annotations)")
    if arr.shape[2:] != np.asarray(annotations).shape[1:]:
        raise UsageError(
            f"ged2_paper: samples {arr.shape} ([M, S, *sp]) and annotations "
            f"{np.asarray(annotations).shape} ([A, *sp]) differ in space"
        )
    d_yy = (1 - _pairwise(y, y, "dice")).mean()
    values = []
    for m in range(arr.shape[0]):
        s = (arr[m] != 0).reshape(arr.shape[1], -1)
        d_sy = (1 - _pairwise(s, y, "dice")).mean()
        d_ss = (1 - _pairwise(s, s, "dice")).mean()
        values.append(2 * d_sy - d_ss - d_yy)
    return float(np.mean(values))


def hungarian_iou(samples: npt.ArrayLike, annotations: npt.ArrayLike) -> float:
    """Mean IoU (foreground) of the assignment of samples to annotators maximising IoU.

    The annotator set is repeated ``ceil(N / A)`` times so that every sample
    gets its own target; each sample is matched to a distinct copy.

    Args:
        samples: ``[N, *sp]`` model samples.
        annotations: ``[A, *sp]`` annotator label maps.
    """
    s = _stack(samples, "hungarian_iou(samples)")
    y = _stack(annotations, "hungarian_iou(annotations)")
    _same_spatial(np.asarray(samples), np.asarray(annotations), "hungarian_iou")
    iou = _pairwise(s, y, "iou")
    reps = -(-s.shape[0] // y.shape[0])
    cost = np.tile(iou, (1, reps))
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return float(cost[rows, cols].mean())


def annotator_disagreement(annotations: npt.ArrayLike) -> float:
    """Mean pairwise 1 - IoU (foreground) between distinct annotators; 0 for one annotator."""
    y = _stack(annotations, "annotator_disagreement(annotations)")
    a = y.shape[0]
    if a < 2:
        return 0.0
    d = 1 - _pairwise(y, y, "iou")
    return float(d[np.triu_indices(a, k=1)].mean())


# --------------------------------------------------------------------------- ambiguity


def ncc(uncertainty_map: npt.ArrayLike, annotations: npt.ArrayLike) -> float:
    """Normalised cross-correlation of a map with the annotators' per-voxel mask variance.

    ``sum((U - mean U)(V - mean V)) / (n std(U) std(V))``, std with ddof = 1,
    V = variance (over annotators) of the foreground masks; 0 if either map is
    constant.

    Args:
        uncertainty_map: ``[*sp]``.
        annotations: ``[A, *sp]`` label maps.
    """
    u = finite_array(uncertainty_map, "ncc(uncertainty_map)").astype(np.float64)
    y = _labels(annotations, "ncc(annotations)", min_ndim=2)
    if y.shape[1:] != u.shape:
        raise UsageError(f"ncc: annotations {y.shape} do not match the map {u.shape} ([A, *sp])")
    v = (y != 0).var(axis=0, dtype=np.float64)
    n = u.size
    if n < 2:
        return 0.0
    su, sv = u.std(ddof=1), v.std(ddof=1)
    if su == 0 or sv == 0:
        return 0.0
    return float(((u - u.mean()) * (v - v.mean())).sum() / (n * su * sv))


def ambiguity_correlation(au_scores: npt.ArrayLike, disagreement: npt.ArrayLike) -> float | None:
    """Spearman correlation of image-level AU with annotator disagreement across images.

    None when either side is constant.
    """
    return rank_correlation(au_scores, disagreement)


# --------------------------------------------------------------------------- calibration


def ece(probs: npt.ArrayLike, annotations: npt.ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error over ``max_k p̄_k`` with ``n_bins`` equal-width bins.

    A voxel's accuracy is the share of annotators whose label equals the
    predicted label (argmax). To pool a test set, stack its images along an
    extra spatial axis.

    Args:
        probs: ``[K, *sp]`` predictive probabilities p̄.
        annotations: ``[A, *sp]`` (or ``[*sp]``) label maps.
    """
    p, _ = check_probabilities(probs, 0, "ece(probs)")
    y = _labels(annotations, "ece(annotations)")
    if y.shape == p.shape[1:]:
        y = y[None]
    if y.shape[1:] != p.shape[1:]:
        raise UsageError(f"ece: annotations {y.shape} do not match probs {p.shape} ([K, *sp])")
    _check_bins(n_bins, "ece")
    conf = p.max(axis=0).reshape(-1).astype(np.float64)
    pred = p.argmax(axis=0)
    acc = (y == pred[None]).mean(axis=0, dtype=np.float64).reshape(-1)
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    gap = np.abs(
        np.bincount(idx, weights=acc, minlength=n_bins)
        - np.bincount(idx, weights=conf, minlength=n_bins)
    )
    # sum_b (n_b / n) |acc_b - conf_b| with acc_b, conf_b bin means
    return float(gap.sum() / count.sum())


def _check_bins(n_bins: int, name: str) -> None:
    if int(n_bins) != n_bins or n_bins < 1:
        raise UsageError(f"{name}: n_bins must be a positive integer, got {n_bins}")


def _correct_counts(
    u: npt.ArrayLike, correct: npt.ArrayLike, name: str
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Flatten to (u, number correct, number of trials) per voxel.

    ``correct`` is ``u``'s shape (one trial per voxel) or ``[A, *u.shape]``
    (one trial per annotator, as the paper's ACE counts them).
    """
    uu = finite_array(u, f"{name}(u)").astype(np.float64)
    c = np.asarray(correct)
    if c.dtype.kind not in "biuf":
        raise UsageError(f"{name}(correct): expected booleans, got dtype {c.dtype}")
    if not np.isin(c, (0, 1)).all():
        raise UsageError(f"{name}(correct): values must be 0/1 or booleans")
    if c.shape == uu.shape:
        pos = c.astype(np.float64).reshape(-1)
        tot = np.ones_like(pos)
    elif c.shape[1:] == uu.shape and c.ndim == uu.ndim + 1:
        pos = c.sum(axis=0, dtype=np.float64).reshape(-1)
        tot = np.full_like(pos, c.shape[0])
    else:
        raise UsageError(
            f"{name}: correct has shape {c.shape}; expected {uu.shape} or [A, *{uu.shape}]"
        )
    if uu.size == 0:
        raise UsageError(f"{name}: no voxels")
    return uu.reshape(-1), pos, tot


def _softplus(x: FloatArray) -> FloatArray:
    return np.logaddexp(0.0, x)


def platt_confidence(u: npt.ArrayLike, a: float, b: float) -> FloatArray:
    """Platt-scaled confidence ``1 / (1 + exp(a u + b))`` (float64, overflow-safe)."""
    f = a * np.asarray(u, dtype=np.float64) + b
    return 0.5 * (1.0 - np.tanh(0.5 * f))


def platt_fit(u: npt.ArrayLike, correct: npt.ArrayLike, max_iter: int = 100) -> tuple[float, float]:
    """Fit Platt scaling ``conf = 1 / (1 + exp(a u + b))`` from uncertainty to correctness.

    Platt's (1999) method: maximum likelihood with his smoothed targets
    ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``, solved by Newton's method
    with backtracking (the same objective as scikit-learn's sigmoid
    calibration). Typically ``a > 0``: more uncertainty, less confidence.

    Args:
        u: ``[*sp]`` uncertainty values (validation data).
        correct: ``[*sp]`` or ``[A, *sp]`` 0/1: the annotator's label equals the prediction.

    Returns:
        ``(a, b)``.
    """
    x, pos, tot = _correct_counts(u, correct, "platt_fit")
    n_pos = float(pos.sum())
    n_neg = float(tot.sum()) - n_pos
    t_pos = (n_pos + 1) / (n_pos + 2)
    t_neg = 1 / (n_neg + 2)
    # y: smoothed positive mass per voxel; fitting p = sigmoid(-f), f = a u + b
    y = pos * t_pos + (tot - pos) * t_neg
    # standardise u so the Newton steps are well conditioned
    mu, sd = float(x.mean()), float(x.std())
    sd = sd if sd > 0 else 1.0
    z = (x - mu) / sd

    def loss(w: FloatArray) -> float:
        f = w[0] * z + w[1]
        return float((y * _softplus(f) + (tot - y) * _softplus(-f)).sum())

    w = np.array([0.0, math.log((n_neg + 1) / (n_pos + 1))])
    cur = loss(w)
    for _ in range(max_iter):
        f = w[0] * z + w[1]
        p = 0.5 * (1.0 - np.tanh(0.5 * f))  # sigmoid(-f)
        g_f = y - tot * p
        h_f = tot * p * (1 - p)
        # einsum, not `@`: a BLAS dot product's last digit depends on its thread count.
        hz = np.einsum("i,i->", h_f, z)
        grad = np.array([np.einsum("i,i->", g_f, z), g_f.sum()])
        hess = np.array([[np.einsum("i,i->", h_f, z * z), hz], [hz, h_f.sum()]])
        hess += 1e-12 * np.eye(2) * max(1.0, float(np.trace(hess)))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = w - t * step
            new = loss(cand)
            if new <= cur or t < 1e-10:
                break
            t /= 2
        done = abs(cur - new) <= 1e-12 * max(1.0, abs(cur))
        if new <= cur:
            w, cur = cand, new
        if done or float(np.abs(t * step).max()) < 1e-12:
            break
    a = w[0] / sd
    b = w[1] - w[0] * mu / sd
    return float(a), float(b)


def ace(u: npt.ArrayLike, correct: npt.ArrayLike, a: float, b: float, n_bins: int = 20) -> float:
    """The paper's ACE: the unweighted mean calibration gap over non-empty bins.

    ``conf = 1 / (1 + exp(a u + b))`` binned into ``n_bins`` equal-width bins
    over [0, 1]; ACE = mean over non-empty bins of ``|accuracy - mean conf|``
    (ECE would weight the same gaps by bin mass).

    Args:
        u: ``[*sp]`` uncertainty values (test data).
        correct: ``[*sp]`` or ``[A, *sp]`` 0/1 correctness (one trial per annotator).
        a, b: from :func:`platt_fit` on validation data.
    """
    _check_bins(n_bins, "ace")
    if not (math.isfinite(a) and math.isfinite(b)):
        raise UsageError(f"ace: Platt parameters must be finite, got a={a}, b={b}")
    x, pos, tot = _correct_counts(u, correct, "ace")
    conf = platt_confidence(x, a, b)
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(idx, weights=tot, minlength=n_bins)
    hits = np.bincount(idx, weights=pos, minlength=n_bins)
    csum = np.bincount(idx, weights=conf * tot, minlength=n_bins)
    nz = n > 0
    return float(np.abs(hits[nz] / n[nz] - csum[nz] / n[nz]).mean())


# --------------------------------------------------------------------------- OOD


def _two_scores(
    scores_in: npt.ArrayLike, scores_out: npt.ArrayLike, name: str
) -> tuple[FloatArray, FloatArray]:
    a = finite_array(np.asarray(scores_in, dtype=np.float64).reshape(-1), f"{name}(scores_in)")
    b = finite_array(np.asarray(scores_out, dtype=np.float64).reshape(-1), f"{name}(scores_out)")
    if a.size == 0 or b.size == 0:
        raise UsageError(f"{name}: need at least one in-distribution and one OOD score")
    return a.astype(np.float64), b.astype(np.float64)


def auroc(scores_in: npt.ArrayLike, scores_out: npt.ArrayLike) -> float:
    """Area under the ROC curve for telling OOD (positive, higher score) from ID.

    The Mann-Whitney statistic: P(score_out > score_in) + 0.5 P(equal).
    """
    a, b = _two_scores(scores_in, scores_out, "auroc")
    allv = np.concatenate([a, b])
    order = np.argsort(allv, kind="mergesort")
    xs = allv[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(allv.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    r_out = ranks[a.size :].sum()
    return float((r_out - b.size * (b.size + 1) / 2) / (a.size * b.size))


def fpr_at_95_tpr(scores_in: npt.ArrayLike, scores_out: npt.ArrayLike) -> float:
    """False-positive rate (ID flagged) at the highest threshold detecting >= 95 % of OOD."""
    a, b = _two_scores(scores_in, scores_out, "fpr_at_95_tpr")
    k = math.ceil(0.95 * b.size - 1e-9)  # OOD scores that must be at or above the threshold
    thr = np.sort(b)[::-1][k - 1]
    return float(np.count_nonzero(a >= thr) / a.size)
