"""The structured report (SR): image scores, OOD verdict, volumes, as TID 1500 measurements."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from uqserve.sidecar.outputs.attributes import (
    _series_number,
)
from uqserve.sidecar.outputs.common import (
    MILLILITER,
    NAT,
    PERCENT,
    SCHEME,
    UNITY,
    OutputOptions,
)
from uqserve.sidecar.outputs.uids import _uid


def _num(name: str, value: float, unit: hd.sr.CodedConcept, code: str) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=hd.sr.CodedConcept(code, SCHEME, name[:64]),
        value=float(value),
        unit=unit,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _text(name: str, value: str, code: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=hd.sr.CodedConcept(code, SCHEME, name[:64]),
        value=value,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def report_facts(report: Mapping[str, Any]) -> dict[str, Any]:
    """The facts a reader needs, pulled from a predict report (tolerant of missing keys).

    Returns ``ood`` (dict with score, threshold, flag, percentile, or None),
    ``entanglement`` (float or None), ``volumes`` ({class: {mean_ml, ci95_ml}}),
    ``model`` (str).
    """
    ood = report.get("ood")
    ood = dict(ood) if isinstance(ood, Mapping) else None
    ent = report.get("entanglement")
    if isinstance(ent, Mapping):
        ent = ent.get("scan", ent.get("spearman", ent.get("value")))
    entanglement = (
        float(ent) if isinstance(ent, (int, float)) and math.isfinite(float(ent)) else None
    )
    volumes = report.get("volumes", report.get("volume_distribution", {}))
    volumes = (
        {str(k): dict(v) for k, v in volumes.items() if isinstance(v, Mapping)}
        if isinstance(volumes, Mapping)
        else {}
    )
    bundle = report.get("bundle")
    model = (
        str(bundle.get("name", ""))
        if isinstance(bundle, Mapping)
        else str(bundle or report.get("model", ""))
    )
    return {"ood": ood, "entanglement": entanglement, "volumes": volumes, "model": model}


def summary_line(report: Mapping[str, Any]) -> str:
    """One plain-language sentence for a radiologist."""
    facts = report_facts(report)
    parts = []
    ood = facts["ood"]
    if ood and ood.get("flag") is not None and ood.get("threshold") is not None:
        verdict = "UNUSUAL (out of distribution)" if ood["flag"] else "typical (in distribution)"
        pct = ood.get("percentile")
        pct_s = f", {float(pct):.0f}th percentile of validation scans" if pct is not None else ""
        parts.append(
            f"Scan looks {verdict} for this model: EU score {float(ood['score']):.4g} vs threshold "
            f"{float(ood['threshold']):.4g}{pct_s}."
        )
    else:
        parts.append("No OOD threshold calibrated for this model: OOD flag not available.")
    for name, v in facts["volumes"].items():
        ci = v.get("ci95_ml")
        ci_s = f" (95 % interval {float(ci[0]):.3g}-{float(ci[1]):.3g} mL)" if ci else ""
        parts.append(f"{name} volume {float(v.get('mean_ml', float('nan'))):.3g} mL{ci_s}.")
    if facts["entanglement"] is not None:
        parts.append(
            f"AU-EU rank correlation in this scan {facts['entanglement']:.2f} "
            "(near 1: EU mirrors AU)."
        )
    parts.append("Research use only; not for diagnosis.")
    return " ".join(parts)


def make_report(
    source: Sequence[Dataset],
    report: Mapping[str, Any],
    *,
    key: str,
    options: OutputOptions = OutputOptions(),
    evidence: Sequence[Dataset] = (),
    omitted: Sequence[str] = (),
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR holding the report facts as coded, numeric and text items.

    ``evidence`` (e.g. the SEG and maps) is listed with the source images in
    the Current Requested Procedure Evidence Sequence. ``omitted`` names source
    attributes left empty in every output because their values were invalid.
    """
    facts = report_facts(report)
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("UQREPORT", SCHEME, "Segmentation uncertainty report"),
    )
    items: list[Any] = [_text("Summary", summary_line(report), "SUMMARY")]
    items.append(_text("Model", f"{options.model_name} ({options.model_version})", "MODEL"))
    if omitted:
        note = (
            f"Left empty in these results because the source images hold invalid values: "
            f"{', '.join(omitted)}."
        )
        items.append(_text("Omitted source attributes", note, "OMITTED"))
    ood = facts["ood"]
    if ood and ood.get("score") is not None:
        items.append(_num("OOD score (image-level EU)", float(ood["score"]), NAT, "OODSCORE"))
        if ood.get("threshold") is not None:
            items.append(_num("OOD threshold", float(ood["threshold"]), NAT, "OODTHRESH"))
        if ood.get("percentile") is not None:
            items.append(
                _num(
                    "OOD score percentile among validation scans",
                    float(ood["percentile"]),
                    PERCENT,
                    "OODPCT",
                )
            )
        if ood.get("flag") is not None and ood.get("threshold") is not None:
            items.append(
                hd.sr.CodeContentItem(
                    name=hd.sr.CodedConcept("OODFLAG", SCHEME, "Out of distribution"),
                    value=codes.SCT.Yes if ood["flag"] else codes.SCT.No,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
    if facts["entanglement"] is not None:
        items.append(
            _num(
                "AU-EU Spearman correlation (entanglement)",
                facts["entanglement"],
                UNITY,
                "ENTANGLE",
            )
        )
    for i, (name, v) in enumerate(facts["volumes"].items()):
        if v.get("mean_ml") is not None:
            items.append(
                _num(f"{name} volume, mean", float(v["mean_ml"]), MILLILITER, f"VOLMEAN{i}")
            )
        ci = v.get("ci95_ml")
        if ci:
            items.append(
                _num(f"{name} volume, 2.5 % quantile", float(ci[0]), MILLILITER, f"VOLLO{i}")
            )
            items.append(
                _num(f"{name} volume, 97.5 % quantile", float(ci[1]), MILLILITER, f"VOLHI{i}")
            )
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[*source, *evidence],
        content=root,
        series_instance_uid=_uid(key, source, "report", "series"),
        series_number=_series_number(source, "report"),
        sop_instance_uid=_uid(key, source, "report", "instance"),
        instance_number=1,
        manufacturer=options.manufacturer,
        is_complete=True,
        series_description=f"uqserve report ({options.model_name})"[:64],
    )
