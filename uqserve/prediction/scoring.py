"""Scoring: the decomposition -> segmentation, image scores, OOD decision, volumes.

All maps here are in one axis order (any), with the class axis first for
the mean prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from uqserve import uncertainty
from uqserve.bundle import Manifest
from uqserve.prediction.options import PredictError
from uqserve.prediction.report import (
    EntanglementSample,
    ImageScores,
    OodInfo,
    Scores,
    VolumeStats,
    jsonable,
)

__all__ = ["Scores", "score_prediction", "segment"]


def segment(mean: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """The segmentation: argmax over classes of the mean prediction ``[K, *sp]`` -> ``[*sp]``."""
    return uncertainty.segmentation(mean)


def score_prediction(
    dec: uncertainty.Decomposition,
    seg: npt.NDArray[np.uint8],
    counts: npt.NDArray[np.float64],
    man: Manifest,
    *,
    voxel_ml: float,
    bundle_path: Path | str,
    warnings: list[str],
    seed: int = 0,
    exact_scores: bool = False,
) -> Scores:
    """Image scores, OOD, entanglement and volumes of one scan.

    ``counts`` ``[M, S, K]``: voxels per class in each coherent sample;
    ``voxel_ml``: one voxel's volume in mL. The entanglement ranks a
    ``seed``-ed sample of ``uncertainty.SCORE_SAMPLE`` voxels when more
    qualify (every one with ``exact_scores``). Raises ``PredictError`` when the
    OOD aggregator needs a threshold the bundle was not calibrated with.
    """
    M, S, K = man.num_members, man.num_samples, man.num_classes
    agg = man.default_aggregator
    scorer = uncertainty.ImageScorer(seg=seg, member_foreground=dec.member_foreground)
    image: ImageScores = {
        "aggregator": agg,
        "tu": _score(scorer, dec.tu, man, agg, "tu"),
        "au": _score(scorer, dec.au, man, agg, "au"),
        "eu": _score(scorer, dec.eu, man, agg, "eu"),
        "au_sample": _score(scorer, dec.au_sample, man, agg, "au_sample"),
        "au_latent": _score(scorer, dec.au_latent, man, agg, "au_latent"),
    }
    ood_score = _score(scorer, dec.eu, man, man.ood.aggregator, "eu") if M > 1 else 0.0
    if ood_score is None:
        raise PredictError(
            f"{bundle_path}: OOD aggregator 'threshold' has no EU cut-off in the manifest; "
            "run `uqserve calibrate` on the bundle"
        )
    ood = ood_info(man, ood_score)
    if M == 1:
        warnings.append("bundle has no epistemic method (one member): EU is 0, no OOD flag")
    ent_scan, sample = _entanglement(dec, K, seed, exact_scores)
    vols = uncertainty.volume_distribution(counts.reshape(M * S, K), voxel_ml, list(man.classes))
    return Scores(
        image=image,
        ood=ood,
        entanglement=None if ent_scan is None else float(ent_scan),
        volumes=cast(dict[str, VolumeStats], jsonable(vols)),
        entanglement_sample=sample,
    )


def _entanglement(
    dec: uncertainty.Decomposition, K: int, seed: int, exact: bool
) -> tuple[float | None, EntanglementSample | None]:
    """The scan's AU~EU rho, and the sample it came from (None: every voxel)."""
    if exact:
        return uncertainty.scan_entanglement(dec.tu, dec.au, dec.eu, K), None
    got = uncertainty.sampled_scan_entanglement(
        dec.tu, dec.au, dec.eu, K, size=uncertainty.SCORE_SAMPLE, seed=seed
    )
    if got.exact:
        return got.rho, None
    sample: EntanglementSample = {
        "size": got.size, "population": got.population, "seed": seed,
        "standard_error": got.standard_error,
    }  # fmt: skip
    return got.rho, sample


def _score(
    scorer: uncertainty.ImageScorer,
    u: npt.NDArray[np.float32],
    man: Manifest,
    aggregator: str,
    key: str,
) -> float | None:
    """One map's image score; None for ``threshold`` without a calibrated cut-off."""
    validation = man.validation if isinstance(man.validation, dict) else {}
    thresholds = validation.get("thresholds", {})
    thr = thresholds.get(key) if isinstance(thresholds, dict) else None
    if aggregator == "threshold" and thr is None:
        return None  # the bundle was calibrated without a cut-off for this map
    return scorer.score(u, aggregator, threshold=None if thr is None else float(thr))


def ood_info(man: Manifest, score: float) -> OodInfo:
    """The OOD decision for an image-level EU ``score``, with the bundle's threshold τ.

    τ is the manifest's, or the ``quantile`` of its validation scores; none
    for a single-member bundle (EU is 0 by construction).
    """
    spec = man.ood
    threshold = spec.threshold
    if threshold is None and spec.validation_scores:
        threshold = uncertainty.calibrate_ood_threshold(
            np.asarray(spec.validation_scores), spec.quantile
        )
    if man.num_members == 1:
        threshold = None
    res = uncertainty.ood_decision(score, threshold, np.asarray(spec.validation_scores))
    d: dict[str, Any] = dict(jsonable(res.to_dict()))
    d["aggregator"] = spec.aggregator
    return cast(OodInfo, d)
