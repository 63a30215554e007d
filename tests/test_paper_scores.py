"""The paper's Δ and rank scores on hand-computable inputs."""

from __future__ import annotations

import math

import pytest

from uqserve.evaluation.paper import paper_scores, rank_scores

R3 = math.sqrt(3.0)  # atan2(sqrt(3) u, u) = pi/3 -> Δ = 1/3; atan2(u, sqrt(3) u) -> Δ = -1/3
AU_MEAN = 0.75 / R3


def _shift(eu: float, au: float, ncc_au: float, ncc_eu: float, ace: tuple) -> dict:
    return {
        "auroc_eu": eu,
        "auroc_au": au,
        "ncc_au": ncc_au,
        "ncc_eu": ncc_eu,
        "ace_tu": ace[0],
        "ace_au": ace[1],
        "ace_eu": ace[2],
    }


SHIFTS = {
    "noise": _shift(0.9, AU_MEAN + 0.1, 0.6, 0.1, (0.1, 0.2, 0.5)),
    "blur": _shift(0.8, AU_MEAN - 0.1, 0.5, -0.1, (0.3, 0.5, 0.2)),
    "contrast": _shift(0.7, AU_MEAN + 0.05, 0.7, 0.2, (0.2, 0.2, 0.9)),
    "jpeg": _shift(0.6, AU_MEAN - 0.05, 0.6, -0.2, (0.2, 0.9, 0.2)),
    # Not a paper shift: extreme values that would move every mean if mixed in.
    "inversion": _shift(0.0, 1.0, -1.0, 1.0, (9.0, 0.0, 0.0)),
}
ID = {"ncc_au": 0.5, "ncc_eu": 0.5, "ace_tu": 0.1, "ace_au": 0.3, "ace_eu": 0.1 * R3}


def test_paper_delta_averages_the_four_shifts_before_delta() -> None:
    p = paper_scores(ID, SHIFTS)
    assert p["shifts_used"] == ["noise", "blur", "contrast", "jpeg"] and p["shifts_missing"] == []
    assert p["auroc_eu_paper"] == pytest.approx(0.75)
    assert p["auroc_au_paper"] == pytest.approx(AU_MEAN)
    assert p["delta_ood"] == pytest.approx(1 / 3)
    # Ambiguity: Δ_ID = 0 (equal NCCs), Δ_OOD = 1 (mean NCC of EU is 0): mean 1/2.
    assert p["ambiguity"]["id"]["delta"] == pytest.approx(0.0)
    assert p["ambiguity"]["ood"] == pytest.approx({"ncc_au": 0.6, "ncc_eu": 0.0, "delta": 1.0})
    assert p["delta_ambiguity"] == pytest.approx(0.5)
    # Calibration: the wrong ACE is min(AU, EU) per shift (0.2 on each), then averaged
    # (min of the means would be 0.45); TU's mean ACE is 0.2 too: Δ_OOD = 0.
    assert p["calibration"]["ood"] == pytest.approx({"ace_tu": 0.2, "ace_min": 0.2, "delta": 0.0})
    # ID: TU 0.1 vs min(0.3, 0.1 sqrt 3): lower is better, so Δ = +1/3.
    assert p["calibration"]["id"]["delta"] == pytest.approx(1 / 3)
    assert p["delta_calibration"] == pytest.approx(1 / 6)
    assert p["delta_mean"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 6) / 3)
    assert p["per_shift"]["blur"]["ace_min"] == pytest.approx(0.2)
    assert "inversion" not in p["per_shift"]


def test_missing_paper_shifts_are_listed_and_the_rest_averaged() -> None:
    p = paper_scores(ID, {k: SHIFTS[k] for k in ("noise", "inversion")})
    assert p["shifts_used"] == ["noise"] and p["shifts_missing"] == ["blur", "contrast", "jpeg"]
    assert p["auroc_eu_paper"] == pytest.approx(0.9)
    none = paper_scores(ID, {"inversion": SHIFTS["inversion"]})
    assert math.isnan(none["delta_ood"]) and math.isnan(none["delta_mean"])
    assert none["ambiguity"]["id"]["delta"] == pytest.approx(0.0)


def _model(d_ood: float, auroc: float, amb: tuple, ncc: tuple, cal: tuple, ace: tuple) -> dict:
    return {
        "delta_ood": d_ood,
        "auroc_eu_paper": auroc,
        "ambiguity": {
            "id": {"delta": amb[0], "ncc_au": ncc[0]},
            "ood": {"delta": amb[1], "ncc_au": ncc[1]},
        },
        "calibration": {
            "id": {"delta": cal[0], "ace_tu": ace[0]},
            "ood": {"delta": cal[1], "ace_tu": ace[1]},
        },
    }


def test_rank_scores_rank_highest_first_with_ties_averaged() -> None:
    models = {
        "a": _model(0.5, 0.9, (0.3, 0.1), (0.5, 0.4), (0.2, 0.2), (0.05, 0.10)),
        "b": _model(0.5, 0.7, (0.1, 0.3), (0.6, 0.1), (0.1, 0.1), (0.10, 0.05)),
        "c": _model(0.1, 0.8, (0.2, 0.2), (0.4, 0.2), (0.0, 0.3), (0.20, 0.20)),
        "d": _model(math.nan, 0.6, (0.0, 0.0), (0.1, 0.0), (-1.0, -1.0), (0.30, 0.30)),
    }
    r = rank_scores(models)
    assert (r["a"]["ENTRANK_auc"], r["b"]["ENTRANK_auc"], r["c"]["ENTRANK_auc"]) == (1.5, 1.5, 3)
    assert math.isnan(r["d"]["ENTRANK_auc"]) and math.isnan(r["d"]["ENTRANK_avg"])
    # Ambiguity: half the ID rank plus half the OOD rank.
    assert r["a"]["ENTRANK_ncc"] == 0.5 * 1 + 0.5 * 3
    assert r["c"]["ENTRANK_ncc"] == 0.5 * 2 + 0.5 * 2
    assert r["b"]["PERFRANK_auc"] == 3 and r["a"]["PERFRANK_auc"] == 1
    assert r["a"]["PERFRANK_ncc"] == 0.5 * 2 + 0.5 * 1
    # ACE of TU: lowest first.
    assert r["a"]["PERFRANK_ace"] == 0.5 * 1 + 0.5 * 2
    assert r["d"]["PERFRANK_ace"] == 4
    a = r["a"]
    assert a["PERFRANK_avg"] == pytest.approx((1 + 1.5 + 1.5) / 3)
    assert a["ENTRANK_avg"] == pytest.approx((1.5 + 2 + a["ENTRANK_ace"]) / 3)
