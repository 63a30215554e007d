"""uqserve.metrics: known answers and parity with independent implementations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from uqserve.metrics import (
    ace,
    ambiguity_correlation,
    annotator_disagreement,
    auroc,
    dice,
    ece,
    fpr_at_95_tpr,
    ged2,
    ged2_paper,
    hungarian_iou,
    ncc,
    platt_confidence,
    platt_fit,
)

PROPS = settings(max_examples=60, deadline=None)


def masks(seed: int, n: int, shape: tuple[int, ...] = (6, 7), p: float = 0.4) -> np.ndarray:
    """[n, *shape] uint8 binary masks; some rows emptied to exercise IoU(empty, empty)."""
    rng = np.random.default_rng(seed)
    m = (rng.random((n, *shape)) < p).astype(np.uint8)
    m[rng.random(n) < 0.2] = 0
    return m


def iou_loop(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def dice_loop(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    den = a.sum() + b.sum()
    return 1.0 if den == 0 else 2 * np.logical_and(a, b).sum() / den


# --------------------------------------------------------------------------- overlap


def test_dice_known_values() -> None:
    pred = np.array([[0, 1, 1, 2]])
    ann = np.array([[[0, 1, 0, 2]], [[0, 1, 1, 0]]])  # two annotators
    # class 1: 2*1/3 and 2*2/4; class 2: 2*1/2 and 0
    np.testing.assert_allclose(dice(pred, ann, 3), [(2 / 3 + 1) / 2, 0.5])
    # a class absent from prediction and reference scores 1
    np.testing.assert_allclose(dice(np.zeros((3, 3), int), np.zeros((3, 3), int), 2), [1.0])


def test_ged2_known_values() -> None:
    a = np.array([[1, 1, 0, 0]])
    b = np.array([[0, 1, 1, 0]])
    assert ged2(a, a) == pytest.approx(0.0)
    # d(a, b) = 1 - 1/3; GED² = 2 (2/3) - 0 - 0
    assert ged2(a, b) == pytest.approx(4 / 3)
    # empty vs empty: IoU 1, distance 0
    z = np.zeros((2, 4), int)
    assert ged2(z, z) == pytest.approx(0.0)


@PROPS
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 5))
def test_ged2_matches_loop(seed: int, n: int, a: int) -> None:
    s, y = masks(seed, n), masks(seed + 1, a)
    d_sy = np.mean([1 - iou_loop(i, j) for i in s for j in y])
    d_ss = np.mean([1 - iou_loop(i, j) for i in s for j in s])
    d_yy = np.mean([1 - iou_loop(i, j) for i in y for j in y])
    assert ged2(s, y) == pytest.approx(2 * d_sy - d_ss - d_yy, abs=1e-12)
    assert ged2(s, y) >= -1e-12  # an energy distance (1 - IoU is a metric)


def test_ged2_paper_is_member_average_of_dice_ged() -> None:
    samples = masks(4, 6).reshape(2, 3, 6, 7)  # [M=2, S=3, *sp]
    ann = masks(5, 4)
    d_yy = np.mean([1 - dice_loop(i, j) for i in ann for j in ann])
    per_member = []
    for member in samples:
        d_sy = np.mean([1 - dice_loop(i, j) for i in member for j in ann])
        d_ss = np.mean([1 - dice_loop(i, j) for i in member for j in member])
        per_member.append(2 * d_sy - d_ss - d_yy)
    assert ged2_paper(samples, ann) == pytest.approx(np.mean(per_member), abs=1e-12)


@PROPS
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 4))
def test_hungarian_iou_matches_brute_force(seed: int, n: int, a: int) -> None:
    s, y = masks(seed, n, (5, 5)), masks(seed + 7, a, (5, 5))
    targets = np.concatenate([y] * math.ceil(n / a))  # the annotator set repeated
    iou = np.array([[iou_loop(i, j) for j in targets] for i in s])
    rows = np.arange(n)
    best = max(
        iou[rows, list(choice)].mean() for choice in itertools.permutations(range(len(targets)), n)
    )
    assert hungarian_iou(s, y) == pytest.approx(best, abs=1e-12)


def test_annotator_disagreement() -> None:
    ann = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]])
    # pairs: (0,1) 1 - 1/3, (0,2) 0, (1,2) 1 - 1/3
    assert annotator_disagreement(ann) == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert annotator_disagreement(ann[:1]) == 0.0


# --------------------------------------------------------------------------- ambiguity


@PROPS
@given(st.integers(0, 2**32 - 1))
def test_ncc_is_scaled_pearson(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ann = masks(seed, 4, (8, 9))
    u = rng.random((8, 9))
    v = (ann != 0).var(axis=0)
    n = u.size
    if v.std() == 0:
        assert ncc(u, ann) == 0.0
    else:
        # sum(du dv) / (n sd_u sd_v) with ddof=1 = (n - 1) / n * Pearson r
        r = scipy.stats.pearsonr(u.ravel(), v.ravel()).statistic
        assert ncc(u, ann) == pytest.approx((n - 1) / n * r, abs=1e-12)


def test_ncc_constant_maps_are_zero() -> None:
    ann = masks(1, 3, (4, 4))
    assert ncc(np.ones((4, 4)), ann) == 0.0
    assert ncc(np.random.default_rng(0).random((4, 4)), np.ones((3, 4, 4), int)) == 0.0


def test_ambiguity_correlation_matches_spearman() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random(30), rng.random(30).round(1)
    ref = scipy.stats.spearmanr(a, b).statistic
    assert ambiguity_correlation(a, b) == pytest.approx(ref, abs=1e-12)
    assert ambiguity_correlation(a, np.ones(30)) is None


# --------------------------------------------------------------------------- OOD


@PROPS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 40), st.booleans())
# With ties, sklearn's default drop_intermediate=True drops the ROC point at TPR >= 0.95 that
# FPR@95 needs (this case once compared uqserve's correct 0.85 with a wrong 1.0).
@example(seed=139, n_in=20, n_out=20, ties=True)
def test_auroc_and_fpr_match_sklearn(seed: int, n_in: int, n_out: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n_in), rng.normal(0.7, size=n_out)
    if ties:
        a, b = a.round(0), b.round(0)
    y = np.r_[np.zeros(n_in), np.ones(n_out)]
    assert auroc(a, b) == pytest.approx(roc_auc_score(y, np.r_[a, b]), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, np.r_[a, b], drop_intermediate=False)
    assert fpr_at_95_tpr(a, b) == pytest.approx(fpr[np.argmax(tpr >= 0.95 - 1e-12)], abs=1e-12)


# --------------------------------------------------------------------------- calibration


def platt_reference(u: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """Platt's objective minimised by scipy's BFGS (independent of uqserve's Newton solver)."""
    n_pos = correct.sum()
    n_neg = correct.size - n_pos
    t = np.where(correct, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(w: np.ndarray) -> float:
        f = w[0] * u + w[1]
        return float((t * np.logaddexp(0, f) + (1 - t) * np.logaddexp(0, -f)).sum())

    res = scipy.optimize.minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10})
    return float(res.x[0]), float(res.x[1])


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(-4, 4), st.floats(-2, 2))
def test_platt_fit_matches_reference(seed: int, a: float, b: float) -> None:
    rng = np.random.default_rng(seed)
    u = rng.gamma(1.5, 0.5, size=3000)
    correct = rng.random(3000) < platt_confidence(u, a, b)
    got = platt_fit(u, correct)
    ref = platt_reference(u, correct)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_platt_fit_with_annotator_axis_equals_flattened() -> None:
    rng = np.random.default_rng(8)
    u = rng.random((10, 12))
    correct = rng.random((3, 10, 12)) < 1 / (1 + np.exp(4 * u - 2))
    flat = platt_fit(np.broadcast_to(u, correct.shape).ravel(), correct.ravel())
    np.testing.assert_allclose(platt_fit(u, correct), flat, rtol=1e-8)


def test_ace_known_values() -> None:
    # a = 0, b = 0: every confidence is 0.5, one bin; accuracy 3/4 -> ACE = 0.25
    u = np.array([0.1, 0.2, 0.3, 0.4])
    assert ace(u, np.array([1, 1, 1, 0]), 0.0, 0.0) == pytest.approx(0.25)
    # two bins, unweighted: conf 1/(1+e^{±ln 3}) = 0.25 / 0.75
    u2 = np.array([1.0, 1.0, 1.0, -1.0])
    correct = np.array([0, 0, 1, 1])
    # bin of conf 0.25: accuracy 1/3 (gap 1/12); bin of conf 0.75: accuracy 1 (gap 1/4)
    assert ace(u2, correct, math.log(3), 0.0) == pytest.approx((1 / 12 + 1 / 4) / 2)


def test_ace_is_small_for_a_calibrated_model() -> None:
    rng = np.random.default_rng(5)
    u = rng.gamma(1.5, 0.5, size=(4, 50_000))
    correct = rng.random(u.shape) < platt_confidence(u, 2.0, -1.5)
    a, b = platt_fit(u[:2], correct[:2])
    assert ace(u[2:], correct[2:], a, b) < 0.02
    # the wrong sign of the slope is badly calibrated
    assert ace(u[2:], correct[2:], -a, b) > 0.1


def ece_loop(probs: np.ndarray, ann: np.ndarray, n_bins: int) -> float:
    conf = probs.max(axis=0).ravel()
    acc = (ann == probs.argmax(axis=0)[None]).mean(axis=0).ravel()
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        sel = (conf >= lo) & ((conf < hi) if i < n_bins - 1 else (conf <= hi))
        if sel.any():
            total += sel.sum() / conf.size * abs(acc[sel].mean() - conf[sel].mean())
    return total


@PROPS
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(1, 4))
def test_ece_matches_loop(seed: int, k: int, a: int) -> None:
    rng = np.random.default_rng(seed)
    probs = np.moveaxis(rng.dirichlet(np.ones(k) * 0.5, size=(6, 7)), -1, 0)
    ann = rng.integers(0, k, size=(a, 6, 7))
    assert ece(probs, ann) == pytest.approx(ece_loop(probs, ann, 15), abs=1e-12)


def test_ece_known_value() -> None:
    probs = np.array([[0.9, 0.2], [0.1, 0.8]])  # [K=2, 2 voxels]: conf 0.9 and 0.8
    ann = np.array([[0, 1], [1, 1]])  # voxel 0: 1/2 agree, voxel 1: 2/2 agree
    assert ece(probs, ann) == pytest.approx(0.5 * 0.4 + 0.5 * 0.2)


# --------------------------------------------------------------------------- invalid input


def test_invalid_inputs_raise() -> None:
    m = masks(0, 2)
    with pytest.raises(ValueError, match="spatial"):
        ged2(m, masks(0, 2, (5, 5)))
    with pytest.raises(ValueError, match="integer label"):
        hungarian_iou(m * 0.5, m)
    with pytest.raises(ValueError, match="sum to 1"):
        ece(np.full((2, 3), 0.7), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="do not match"):
        ece(np.full((2, 3), 0.5), np.zeros((1, 4), int))
    with pytest.raises(ValueError, match="0/1"):
        platt_fit(np.ones(3), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="expected"):
        ace(np.ones(3), np.ones(4, bool), 1.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        fpr_at_95_tpr([], [1.0])
    with pytest.raises(ValueError, match="do not match"):
        ncc(np.ones((3, 3)), m)
    with pytest.raises(ValueError, match="num_classes"):
        dice(m[0], m, 1)
