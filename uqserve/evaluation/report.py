"""Result tables: ``results.json``, ``results.csv`` (tidy) and a Markdown table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from uqserve._fs import replace_dir_atomically
from uqserve.evaluation.sets import EvaluationError

# (key in the summary row, Markdown header, digits)
SUMMARY_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("dice", "Dice", 3),
    ("ece", "ECE", 3),
    ("ged2", "GED²", 3),
    ("hm_iou", "HM-IoU", 3),
    ("ncc_au", "NCC(AU)", 3),
    ("ace_tu", "ACE(TU)", 3),
)
DELTA_COLUMNS: tuple[tuple[str, str, int], ...] = (
    # Δ OOD is computed from these two: AUROCs averaged over the paper's four shifts.
    ("auroc_eu_paper", "AUROC EU (paper shifts)", 2),
    ("auroc_au_paper", "AUROC AU (paper shifts)", 2),
    ("delta_ood", "Δ OOD", 2),
    ("delta_ambiguity", "Δ amb.", 2),
    ("delta_calibration", "Δ cal.", 2),
    ("delta_mean", "Δ mean", 2),
    ("rank_correlation", "ρ(AU,EU)", 2),
)


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_row(bundle: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one evaluated bundle (one row of the tables)."""
    res = bundle["results"]
    idm = res["splits"]["id"]
    delta = res["delta"]
    row: dict[str, Any] = {
        "bundle": bundle["name"],
        "combination": bundle["combination"],
        "convention": res["convention"],
        "dice": idm.get("dice"),
        "ece": idm.get("ece"),
        "ged2": idm.get("ged2"),
        "ged2_paper": idm.get("ged2_paper"),
        "hm_iou": idm.get("hm_iou"),
        "ncc_au": idm.get("ncc_au"),
        "ncc_eu": idm.get("ncc_eu"),
        "ace_tu": idm.get("ace_tu"),
        "ace_au": idm.get("ace_au"),
        "ace_eu": idm.get("ace_eu"),
        "ambiguity_spearman": idm.get("ambiguity_spearman"),
    }
    for shift, v in res["shifts"].items():
        row[f"auroc_eu_{shift}"] = v.get("auroc_eu")
        row[f"auroc_au_{shift}"] = v.get("auroc_au")
    if "ood" in res["splits"]:
        row["auroc_eu_all"] = res["splits"]["ood"].get("auroc_eu")
    row["auroc_au_paper"] = delta.get("auroc_au_paper")
    row["auroc_eu_paper"] = delta.get("auroc_eu_paper")
    row["delta_ood"] = delta.get("ood")
    row["delta_ambiguity"] = delta.get("ambiguity")
    row["delta_calibration"] = delta.get("calibration")
    row["delta_mean"] = delta.get("mean")
    row["rank_correlation"] = delta.get("rank_correlation")
    return clean(row)


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{float(v):.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The summary table: rows = bundles; ID metrics, OOD AUROC (EU) per shift, Δ scores."""
    bundles = results["bundles"]
    shifts: list[str] = []
    for b in bundles:
        for s in b["results"]["shifts"]:
            if s not in shifts:
                shifts.append(s)
    cols: list[tuple[str, str, int]] = list(SUMMARY_COLUMNS)
    cols += [(f"auroc_eu_{s}", f"AUROC {s}", 2) for s in shifts]
    cols += list(DELTA_COLUMNS)
    head = ["bundle", "combination", *[c[1] for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: dict[str, str] = {}
    for b in bundles:
        row = summary_row(b)
        conv = row["convention"]
        mark = ""
        if conv != "uqserve":
            mark = {"paper convention": " ¹", "no EU method": " ²"}.get(conv, "")
            notes[mark.strip()] = b["results"]["convention_note"]
        cells = [
            f"{row['bundle']}",
            f"{row['combination']}{mark}",
            *[_fmt(row.get(k), d) for k, _, d in cols],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\n" + "\n".join(f"{k} {v}." for k, v in sorted(notes.items())) + "\n"
    out += (
        "\nID metrics on the pooled in-distribution test sets; AUROC of image-level EU "
        f"(aggregator `{results['aggregator']}`), ID test vs each shift (severities pooled). "
        "AUROC EU/AU (paper shifts): the mean over noise, blur, contrast and JPEG, which Δ OOD "
        "is computed from; Δ ambiguity and Δ calibration: the mean of Δ on ID and Δ on the mean "
        "of those four shifts (as the paper). "
        "Δ: disentanglement (1 = disentangled, 0 = entangled, < 0: the wrong uncertainty type "
        "does better; it leaves [-1, 1] when a performance is negative, e.g. NCC < 0); ρ(AU,EU): "
        "Spearman rank correlation of image-level AU and EU over the ID test set.\n"
    )
    return out


def markdown_report(results: dict[str, Any]) -> str:
    data = results["data"]
    lines = [
        "# uqserve evaluate",
        "",
        f"Data: {data.get('source')}"
        + (f" ({data.get('path')})" if data.get("path") else "")
        + f"; aggregator `{results['aggregator']}`; uqserve {results['uqserve_version']}.",
        "",
        markdown_table(results),
    ]
    return "\n".join(lines)


def tidy_rows(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Long-format rows: bundle, combination, convention, scope, name, metric, value."""
    for b in results["bundles"]:
        res = b["results"]
        base = {
            "bundle": b["name"],
            "combination": b["combination"],
            "convention": res["convention"],
        }
        for scope, group in (
            ("split", res["splits"]),
            ("set", res["sets"]),
            ("shift", res["shifts"]),
        ):
            for name, metrics in group.items():
                for metric, value in metrics.items():
                    if (
                        isinstance(value, int | float) and not isinstance(value, bool)
                    ) or value is None:
                        yield {
                            **base,
                            "scope": scope,
                            "name": name,
                            "metric": metric,
                            "value": value,
                        }
        for metric, value in res["delta"].items():
            if isinstance(value, int | float) or value is None:
                yield {**base, "scope": "delta", "name": "all", "metric": metric, "value": value}
            elif isinstance(value, dict):
                for name, v in _flat(value):
                    yield {**base, "scope": "delta", "name": name, "metric": metric, "value": v}


def _flat(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("a.b", number)`` for every number (or None) in nested dicts; lists skipped."""
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flat(v, name + ".")
        elif (isinstance(v, int | float) and not isinstance(v, bool)) or v is None:
            yield name, v


def results_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    fields = ["bundle", "combination", "convention", "scope", "name", "metric", "value"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for row in tidy_rows(results):
        v = row["value"]
        row["value"] = (
            "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else repr(float(v))
        )
        w.writerow(row)
    return buf.getvalue()


@contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; it replaces ``final`` on success, else is removed."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise EvaluationError(f"{final}: exists and is not a folder; choose another `out_dir`")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise EvaluationError(
            f"{final}: folder exists and is not empty; pass `overwrite=True` or another `out_dir`"
        )
    with replace_dir_atomically(final) as tmp:
        yield tmp


def write_results(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write results.json, results.csv and results.md into ``folder``."""
    out = []
    p = folder / "results.json"
    p.write_text(json.dumps(clean(results), indent=2) + "\n")
    out.append(p)
    p = folder / "results.csv"
    p.write_text(results_csv(results))
    out.append(p)
    p = folder / "results.md"
    p.write_text(markdown_report(results))
    out.append(p)
    return out


def names_unique(names: Sequence[str]) -> list[str]:
    """Make bundle names unique for file names (``a``, ``a-2``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in n) or "bundle"
        seen[safe] = seen.get(safe, 0) + 1
        out.append(safe if seen[safe] == 1 else f"{safe}-{seen[safe]}")
    return out
