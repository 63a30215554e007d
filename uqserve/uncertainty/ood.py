"""Out-of-distribution decision: image-level EU against a calibrated threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.uncertainty.checks import (
    scores_1d,
)

# --------------------------------------------------------------------------- OOD


def calibrate_ood_threshold(id_scores: npt.ArrayLike, quantile: float = 0.95) -> float:
    """The OOD threshold τ: the ``quantile`` (linear interpolation) of in-distribution scores.

    Raises:
        ValueError: no scores, non-finite scores, or quantile outside (0, 1).
    """
    if not 0 < quantile < 1:
        raise UsageError(f"calibrate_ood_threshold: quantile must be in (0, 1), got {quantile}")
    scores = scores_1d(id_scores, "calibrate_ood_threshold(id_scores)")
    return float(np.quantile(scores, quantile))


@dataclass(frozen=True)
class OODResult:
    """One scan's OOD decision.

    score      image-level EU under the bundle's aggregator
    threshold  τ, or None if the bundle was never calibrated
    flag       score > τ (None without τ)
    percentile percentage of validation scores <= score (None without them)
    """

    score: float
    threshold: float | None
    flag: bool | None
    percentile: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": self.threshold,
            "flag": self.flag,
            "percentile": self.percentile,
        }


def ood_decision(
    score: float, threshold: float | None, validation_scores: npt.ArrayLike = ()
) -> OODResult:
    """Flag a scan as out-of-distribution when ``score > threshold``.

    Args:
        score: the scan's image-level EU.
        threshold: τ from :func:`calibrate_ood_threshold`, or None (no flag).
        validation_scores: the in-distribution validation scores τ came from;
            the result's percentile is the share of them at or below ``score``.
    """
    if not math.isfinite(score):
        raise UsageError(f"ood_decision: score must be finite, got {score}")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"ood_decision: threshold must be finite or None, got {threshold}")
    val = np.asarray(validation_scores, dtype=np.float64).reshape(-1)
    percentile = None
    if val.size:
        val = scores_1d(val, "ood_decision(validation_scores)")
        percentile = float(100.0 * np.count_nonzero(val <= score) / val.size)
    flag = None if threshold is None else bool(score > threshold)
    return OODResult(float(score), threshold, flag, percentile)
