"""benchmarks/study.py: intervals, verdicts, resumable runs, the report from per-run files."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study() -> Any:
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study"] = mod  # worker processes pickle its functions by module name
    spec.loader.exec_module(mod)
    return mod


def test_t_interval_and_verdicts(study: Any) -> None:
    # Mean 2, sd 1, n = 3: half-width t(0.975, 2) * 1 / sqrt 3 = 4.303 / 1.732.
    iv = study.t_interval([1.0, 2.0, 3.0, None, math.nan])
    assert iv["mean"] == pytest.approx(2.0) and iv["n"] == 3
    assert iv["half"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert study.verdict(iv) == "inconclusive"  # 2 - 2.48 < 0
    assert study.verdict(study.t_interval([1.0, 1.1, 0.9])) == "supported"
    assert study.verdict(study.t_interval([-1.0, -1.1, -0.9])) == "contradicted"
    assert study.verdict(study.t_interval([5.0])) == "inconclusive"  # one seed: no interval
    assert study.t_interval([])["mean"] is None


def _run(comb: str, seed: int, delta_ood: float, auroc: float) -> dict[str, Any]:
    paper = {
        "delta_ood": delta_ood,
        "auroc_eu_paper": auroc,
        "ambiguity": {"id": {"delta": 0.1, "ncc_au": 0.2}, "ood": {"delta": 0.1, "ncc_au": 0.2}},
        "calibration": {"id": {"delta": 0.1, "ace_tu": 0.1}, "ood": {"delta": 0.1, "ace_tu": 0.1}},
    }
    row = {"delta_ood": delta_ood, "auroc_eu_paper": auroc, "dice_vs_majority": 0.7}
    return {
        "combination": comb,
        "seed": seed,
        "row": row,
        "delta": {"paper": paper},
        "learn_check": {"dice_vs_majority": 0.7, "passed": True},
        "timings": {"train_s": 1.0, "export_s": 2.0},
    }


def test_findings_pair_seeds_and_call_only_separated_intervals(study: Any) -> None:
    runs = []
    for seed, shift in enumerate((0.0, 0.02, -0.02)):
        runs += [
            _run("softmax-ensemble", seed, 0.5 + shift, 0.8),
            _run("ssn-ensemble", seed, 0.4 + shift, 0.7 + 3 * shift),
            _run("ssn-mcdropout", seed, 0.1 + shift, 0.75),
            _run("softmax-none", seed, 0.9, 0.9),  # no EU signal: never in a group
        ]
    found = {f[0]: (f[1], f[2]) for f in study.findings(runs)}
    ood = next(v for k, v in found.items() if k.startswith("Ensembles are less entangled"))
    # Per seed: mean(0.5, 0.4) - 0.1 = 0.35 exactly (the shifts cancel): agree.
    assert ood[0]["mean"] == pytest.approx(0.35) and ood[1] == "supported"
    auc = next(v for k, v in found.items() if k.startswith("Ensembles detect"))
    # Per seed: (0.8 + 0.7 + 3 s) / 2 - 0.75 = 1.5 s: mean 0, interval around 0.
    assert auc[0]["mean"] == pytest.approx(0.0, abs=1e-12) and auc[1] == "inconclusive"
    # softmax-none is first on ENTRANK_auc in every seed, so the softmax ensemble is not.
    gap = study._rank_gap(study._per_seed(runs), "ENTRANK_auc")
    assert gap["mean"] == pytest.approx(-1.0) and study.verdict(gap) == "contradicted"
    ranks = study.rank_table(runs)
    assert ranks["softmax-none"]["ENTRANK_auc"]["mean"] == 1.0  # highest Δ OOD in every seed
    assert ranks["ssn-mcdropout"]["ENTRANK_auc"]["mean"] == 4.0


@pytest.mark.slow
def test_smoke_study_is_resumable_and_reports_from_run_files(tmp_path: Path, study: Any) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--scale", "smoke", "--combinations", "softmax-ensemble", "--seeds", "0", "1"]
    args += ["--out", str(out), "--work", str(work)]
    study.main(args)
    runs = sorted((out / "runs" / "smoke" / "softmax-ensemble").glob("*.json"))
    assert [p.name for p in runs] == ["seed0.json", "seed1.json"]
    rec = json.loads(runs[0].read_text())
    assert set(rec["timings"]) == {"train_s", "export_s", "evaluate_s"}  # no calibration
    assert set(rec["cpu_s"]) == {"train", "export", "evaluate"}
    assert rec["learn_check"]["threshold"] == 0.6
    assert set(rec["shifts"]) == {"noise", "blur", "contrast", "jpeg"}
    for s in rec["shifts"].values():
        assert {"auroc_au", "auroc_eu"} <= set(s)
    assert rec["row"]["auroc_eu_paper"] == pytest.approx(
        sum(s["auroc_eu"] for s in rec["shifts"].values()) / 4
    )
    tu = study._with_tu(rec)["row"]["auroc_tu_paper"]  # the report's AUROC TU column
    assert tu == pytest.approx(sum(s["auroc_tu"] for s in rec["shifts"].values()) / 4)
    before = {p: p.stat().st_mtime_ns for p in runs}
    (out / "study.md").unlink()
    study.main(args)  # resumes: nothing is re-run
    assert {p: p.stat().st_mtime_ns for p in runs} == before
    study.main([*args, "--report"])
    md = (out / "study.md").read_text()
    assert "SMOKE RUN" in md and "softmax-ensemble" in md and "±" in md
    assert "Incomplete: runs missing" in md and "CPU seconds" in md
    doc = json.loads((out / "study.json").read_text())
    assert doc["runs"] == 2 and doc["seeds"] == [0, 1]
    first = doc["per_run"][0]
    assert {"auroc_eu_noise", "auroc_au_jpeg", "auroc_eu_paper", "delta_ood"} <= set(first["row"])
    assert set(first["paper"]["per_shift"]) == {"noise", "blur", "contrast", "jpeg"}
    # --figures: uqserve evaluate's figures of a finished run's bundle, listed by the report.
    study.main([*args, "--figures", "softmax-ensemble"])
    assert (out / "figures" / "study_eval_softmax-ensemble_au_eu.png").stat().st_size > 0
    study.main([*args, "--report"])
    assert "figures/study_eval_softmax-ensemble_au_eu.png" in (out / "study.md").read_text()
    with pytest.raises(SystemExit, match="no bundle"):
        study.main([*args, "--figures", "ssn-none"])


@pytest.mark.slow
def test_shared_networks_are_trained_once_and_reused(tmp_path: Path, study: Any) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    base = ["--scale", "smoke", "--seeds", "0", "--out", str(out), "--work", str(work)]
    study.main([*base, "--combinations", "ssn-none"])
    net0 = work / "seed0" / "shared" / "ssn-net0"
    stamp = {p.name: p.stat().st_mtime_ns for p in net0.iterdir()}
    assert "swag.safetensors" in stamp  # network 0 collects SWAG on the side
    study.main([*base, "--combinations", "ssn-swag", "ssn-swagdiag", "ssn-ensemble"])
    assert {p.name: p.stat().st_mtime_ns for p in net0.iterdir()} == stamp  # not retrained
    rec = {c: json.loads((out / "runs" / "smoke" / c / "seed0.json").read_text())
           for c in ("ssn-none", "ssn-swag", "ssn-swagdiag", "ssn-ensemble")}  # fmt: skip
    assert rec["ssn-none"]["trained_here"] == ["ssn-net0"]
    assert rec["ssn-swag"]["trained_here"] == rec["ssn-swagdiag"]["trained_here"] == []
    assert rec["ssn-ensemble"]["trained_here"] == ["ssn-net1"]  # smoke: ensembles of 2
    assert rec["ssn-ensemble"]["shared_networks"] == ["ssn-net0", "ssn-net1"]
    ck = work / "seed0" / "checkpoints"
    member0 = (net0 / "member_0.safetensors").read_bytes()
    assert (ck / "ssn-none" / "member_0.safetensors").read_bytes() == member0
    assert (ck / "ssn-ensemble" / "member_0.safetensors").read_bytes() == member0
    # Both SWAG rows come from the one collection; SWAG-D keeps no deviation matrix.
    full, diag = (ck / "ssn-swag" / "swag.safetensors", ck / "ssn-swagdiag" / "swag.safetensors")
    assert full.stat().st_size > diag.stat().st_size
    assert (
        rec["ssn-swag"]["learn_check"]["dice_vs_majority"]
        == (rec["ssn-swagdiag"]["learn_check"]["dice_vs_majority"])
    )  # the same SWAG mean


def test_missing_runs_cost_and_statements(tmp_path: Path, study: Any) -> None:
    runs = [_run("softmax-ensemble", s, 0.5, 0.8) for s in (0, 1)]
    for r in runs:
        r["cpu_s"] = {"train": 10.0 + r["seed"], "export": 2.0, "evaluate": 5.0}
    missing = study.missing_runs(runs, "smoke")
    assert len(missing["seed0"]) == len(missing["seed1"]) == 19
    assert "softmax-ensemble" not in missing["seed0"]
    cost = study.cost_table(runs, "smoke")
    assert cost["per_combination"]["softmax-ensemble"]["run"] == pytest.approx(17.5)
    assert cost["grid_cpu_s"] == pytest.approx(35.0)  # 17.5 per seed x 2 seeds
    agg = study.aggregate(runs, "smoke")
    lines = agg["statements"]
    assert "`smoke` scale, 2 of 40 runs, seeds [0, 1]" in lines[0] and "38 runs missing" in lines[0]
    assert any("**inconclusive**" in x for x in lines)
    doc = tmp_path / "README.md"
    doc.write_text(f"a\n{study.STATEMENTS_BEGIN}\nold\n{study.STATEMENTS_END}\nb\n")
    assert study.update_statements(doc, lines)
    text = doc.read_text()
    assert "old" not in text and text.startswith("a\n") and text.endswith("b\n")
    assert f"- {lines[0]}" in text
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not study.update_statements(plain, lines) and plain.read_text() == "no markers\n"
