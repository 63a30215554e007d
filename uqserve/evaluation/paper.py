"""The paper's Δ scores and rank scores, from per-split metrics.

Δ_OOD is Δ(AUROC of EU, AUROC of AU) with each AUROC averaged over the
paper's four shifts (each shift's OOD set against the ID test set).
Δ_ambiguity and Δ_calibration are the mean of Δ on the ID test set and Δ on
"the OOD split", whose metrics are the means over the four shifts; for
calibration the wrong type's ACE is ``min(ACE_AU, ACE_EU)`` taken per shift,
then averaged. Other shifts are reported, never mixed in.

Rank scores (``rank_scores``) rank models against each other per task,
highest first with ties averaged: ENTRANK on Δ (OOD: the OOD Δ; ambiguity and
calibration: half the ID rank plus half the OOD rank), PERFRANK on the
performance of the type that should work (AUROC of EU; NCC of AU; ACE of TU,
lowest first). Each ``*_avg`` is the mean of its three tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from uqserve import uncertainty as U
from uqserve.contracts import PAPER_SHIFTS

__all__ = ["PAPER_SHIFTS", "paper_scores", "rank_scores"]

_PER_SHIFT_KEYS = ("auroc_au", "auroc_eu", "ncc_au", "ncc_eu", "ace_tu", "ace_au", "ace_eu")


def _mean(values: Sequence[float]) -> float:
    """Mean of finite values; NaN when any is missing (a partial mean would mislead)."""
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) for v in vals):
        return math.nan
    return float(np.mean(vals))


def _delta(fn: Callable[..., float], *args: float) -> float:
    """``fn(*args)``; NaN when an input is NaN (an undefined metric upstream)."""
    if not all(math.isfinite(a) for a in args):
        return math.nan
    v = float(fn(*args))
    return v if math.isfinite(v) else math.nan


def _min(a: float, b: float) -> float:
    """min skipping NaN (NaN only when both are), as a table's row minimum."""
    finite = [v for v in (a, b) if math.isfinite(v)]
    return min(finite) if finite else math.nan


def _num(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key)
    return math.nan if v is None else float(v)


def paper_scores(
    id_metrics: Mapping[str, Any],
    shift_metrics: Mapping[str, Mapping[str, Any]],
    shifts: Sequence[str] = PAPER_SHIFTS,
) -> dict[str, Any]:
    """The paper's Δ and the values each comes from.

    ``id_metrics`` holds ``ncc_au``, ``ncc_eu``, ``ace_tu``, ``ace_au``, ``ace_eu`` of
    the ID test set; ``shift_metrics[shift]`` the same plus ``auroc_au`` and
    ``auroc_eu`` (that shift vs the ID test set). Shifts outside ``shifts`` are
    ignored; the OOD means run over the paper shifts that were evaluated (as the
    paper's code does; ``shifts_used``, ``shifts_missing``), NaN when none was.
    """
    used = [s for s in shifts if s in shift_metrics]
    per_shift = {s: {k: _num(shift_metrics[s], k) for k in _PER_SHIFT_KEYS} for s in used}
    for v in per_shift.values():
        v["ace_min"] = _min(v["ace_au"], v["ace_eu"])
    missing = [s for s in shifts if s not in shift_metrics]

    def ood(key: str) -> float:
        return _mean([per_shift[s][key] for s in used])

    au_paper, eu_paper = ood("auroc_au"), ood("auroc_eu")
    amb_id = {"ncc_au": _num(id_metrics, "ncc_au"), "ncc_eu": _num(id_metrics, "ncc_eu")}
    amb_ood = {"ncc_au": ood("ncc_au"), "ncc_eu": ood("ncc_eu")}
    for part in (amb_id, amb_ood):
        part["delta"] = _delta(U.ambiguity_delta, part["ncc_au"], part["ncc_eu"])
    ace_id_min = _min(_num(id_metrics, "ace_au"), _num(id_metrics, "ace_eu"))
    cal_id = {"ace_tu": _num(id_metrics, "ace_tu"), "ace_min": ace_id_min}
    cal_ood = {"ace_tu": ood("ace_tu"), "ace_min": ood("ace_min")}
    for part in (cal_id, cal_ood):
        # calibration_delta(tu, au, eu) takes min(au, eu): pass the min twice.
        part["delta"] = _delta(
            U.calibration_delta, part["ace_tu"], part["ace_min"], part["ace_min"]
        )
    d_ood = _delta(U.ood_delta, eu_paper, au_paper)
    d_amb = _mean([amb_id["delta"], amb_ood["delta"]])
    d_cal = _mean([cal_id["delta"], cal_ood["delta"]])
    return {
        "shifts_used": used,
        "shifts_missing": missing,
        "per_shift": per_shift,
        "auroc_au_paper": au_paper,
        "auroc_eu_paper": eu_paper,
        "delta_ood": d_ood,
        "ambiguity": {"id": amb_id, "ood": amb_ood},
        "delta_ambiguity": d_amb,
        "calibration": {"id": cal_id, "ood": cal_ood},
        "delta_calibration": d_cal,
        "delta_mean": _mean([d_ood, d_amb, d_cal]),
    }


def _ranks(values: Mapping[str, float], ascending: bool = False) -> dict[str, float]:
    """Rank 1 = best (highest, or lowest when ``ascending``), ties averaged, NaN stays NaN."""
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    order = sorted(finite.values(), reverse=not ascending)
    out = {k: math.nan for k in values}
    for k, v in finite.items():
        first = order.index(v) + 1
        count = order.count(v)
        out[k] = first + (count - 1) / 2.0
    return out


def rank_scores(models: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """PERFRANK and ENTRANK of each model from its :func:`paper_scores` (one seed).

    Returns ``{model: {"ENTRANK_auc", "ENTRANK_ncc", "ENTRANK_ace", "ENTRANK_avg",
    "PERFRANK_auc", "PERFRANK_ncc", "PERFRANK_ace", "PERFRANK_avg"}}``; lower is
    better. Average over seeds afterwards.
    """

    def col(get: Callable[[Mapping[str, Any]], float], ascending: bool = False) -> dict:
        return _ranks({m: float(get(p)) for m, p in models.items()}, ascending)

    def half(task: str, key: str, ascending: bool = False) -> dict[str, float]:
        r_id = col(lambda p: p[task]["id"][key], ascending)
        r_ood = col(lambda p: p[task]["ood"][key], ascending)
        return {m: 0.5 * r_id[m] + 0.5 * r_ood[m] for m in models}

    tasks = {
        "ENTRANK_auc": col(lambda p: p["delta_ood"]),
        "ENTRANK_ncc": half("ambiguity", "delta"),
        "ENTRANK_ace": half("calibration", "delta"),
        "PERFRANK_auc": col(lambda p: p["auroc_eu_paper"]),
        "PERFRANK_ncc": half("ambiguity", "ncc_au"),
        "PERFRANK_ace": half("calibration", "ace_tu", ascending=True),
    }
    out: dict[str, dict[str, float]] = {}
    for m in models:
        row = {k: v[m] for k, v in tasks.items()}
        for kind in ("ENTRANK", "PERFRANK"):
            parts = [row[f"{kind}_{t}"] for t in ("auc", "ncc", "ace")]
            row[f"{kind}_avg"] = float(np.mean(parts))
        out[m] = row
    return out
