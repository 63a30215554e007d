"""Evaluate bundles (science.md sections 4-5) and calibrate a bundle's OOD settings.

``evaluate`` runs bundles over in-distribution test sets with several
annotators (low and high ambiguity) and over OOD sets of every shift and
severity, and reports every downstream metric, the paper's entanglement
scores Δ and the AU-EU rank correlation. ``calibrate`` picks a bundle's
default aggregator and OOD threshold on validation data and records them,
with the bundle's Δ scores, in a new manifest version.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uqserve import __version__
from uqserve import uncertainty as U
from uqserve.bundle import (
    MANIFEST_NAME,
    Bundle,
    Manifest,
    OODSpec,
    load_bundle,
    verify_checksums,
    write_manifest,
)
from uqserve.evaluation.core import (
    AGGREGATORS,
    NO_EU,
    PAPER,
    PAPER_AGGREGATOR,
    UQSERVE,
    BundleEvaluation,
    ImagePrediction,
    convention_for,
    to_convention,
)
from uqserve.evaluation.figures import (
    bundle_figures,
    figure_data,
    matplotlib_available,
    summary_figure,
)
from uqserve.evaluation.report import (
    atomic_dir,
    clean,
    markdown_table,
    names_unique,
    summary_row,
    write_results,
)
from uqserve.evaluation.runner import _Progress, bundle_info, run_bundle, source_for
from uqserve.evaluation.sets import DEFAULT_SEVERITIES, EvalImage, EvaluationError, SetSpec

__all__ = [
    "AGGREGATORS",
    "NO_EU",
    "PAPER",
    "UQSERVE",
    "BundleEvaluation",
    "EvalImage",
    "EvaluationError",
    "ImagePrediction",
    "SetSpec",
    "calibrate",
    "convention_for",
    "evaluate",
    "markdown_table",
    "summary_row",
    "to_convention",
]


def _data_options(
    n_test: int,
    n_val: int,
    n_ood: int,
    size: Sequence[int] | None,
    shifts: Sequence[str] | None,
    severities: Sequence[float],
    seed: int,
) -> dict[str, Any]:
    return {
        "n_test": n_test,
        "n_val": n_val,
        "n_ood": n_ood,
        "size": None if size is None else tuple(int(s) for s in size),
        "shifts": None if shifts is None else tuple(shifts),
        "severities": tuple(severities),
        "seed": seed,
    }


def _ood_threshold(bundle: Bundle, ev: BundleEvaluation) -> float | None:
    """The OOD threshold to draw: the manifest's for this aggregator, else 0.95 of val EU."""
    man = bundle.manifest
    if ev.convention == NO_EU:
        return None
    if (
        ev.convention == UQSERVE
        and man.ood.threshold is not None
        and man.ood.aggregator == ev.aggregator
    ):
        return float(man.ood.threshold)
    scores = ev.scores("val", "eu")
    scores = scores[np.isfinite(scores)]
    return U.calibrate_ood_threshold(scores, 0.95) if scores.size else None


def evaluate(
    bundles: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str] = "synthetic",
    out_dir: str | os.PathLike[str] | None = None,
    *,
    servers: Sequence[str] | None = None,
    device: str = "auto",
    aggregator: str = PAPER_AGGREGATOR,
    n_test: int = 32,
    n_val: int = 32,
    n_ood: int = 16,
    size: Sequence[int] | None = None,
    shifts: Sequence[str] | None = None,
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    seed: int = 0,
    figures: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate each bundle; return the results and, with ``out_dir``, write them.

    ``data`` is ``"synthetic"`` or a folder in the format ``uqserve train``
    reads (images + per-annotator label maps). Synthetic images default to
    each bundle's tile size. ``out_dir`` receives ``results.json``,
    ``results.csv`` (tidy), ``results.md`` and ``figures/*.png``; it is
    written atomically (temp folder, then rename).

    Raises ``EvaluationError`` (bad data or options) or ``BundleError``.
    """
    if not bundles:
        raise EvaluationError(
            "no bundle given; pass one or more bundle folders or shipped bundle names"
        )
    if aggregator not in AGGREGATORS:
        raise EvaluationError(
            f"unknown aggregator {aggregator!r}; choose from {', '.join(AGGREGATORS)}"
        )
    options = _data_options(n_test, n_val, n_ood, size, shifts, severities, seed)
    # Everything a user can get wrong is checked before the first image runs.
    loaded = [load_bundle(b) for b in bundles]
    sources = [source_for(b, data, options) for b in loaded]
    if out_dir is not None:
        out = Path(out_dir)
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise EvaluationError(
                f"{out}: folder exists and is not empty; pass --overwrite or another --out"
            )
    want_figures = figures and out_dir is not None
    if want_figures and not matplotlib_available():
        raise EvaluationError(
            "figures need matplotlib: pip install 'uqserve[eval]', or pass --no-figures"
        )
    file_names = names_unique([b.manifest.name for b in loaded])
    results: dict[str, Any] = {
        "uqserve_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "aggregator": aggregator,
        "data": sources[0].description,
        "runtime": {"servers": list(servers) if servers else None, "device": device},
        "bundles": [],
    }
    fig_data: list[dict[str, Any]] = []
    prog = _Progress(progress)
    with prog.session():
        total = prog.task("bundles", len(loaded))
        for bundle, source in zip(loaded, sources, strict=True):
            n_sets = 1 + len(source.sets("test"))
            btask = prog.task(f"{bundle.manifest.name} ({bundle.manifest.combination})", n_sets)
            t0 = time.perf_counter()
            ev = run_bundle(
                bundle,
                source,
                servers=servers,
                device=device,
                aggregator=aggregator,
                progress=prog,
                bundle_task=btask,
                seed=seed + bundle.manifest.seed,
            )
            seconds = time.perf_counter() - t0
            threshold = _ood_threshold(bundle, ev)
            entry = {
                **bundle_info(bundle),
                "data": source.description,
                "seconds": round(seconds, 2),
                "ood_threshold": threshold,
                "results": ev.summary(),
                "images": ev.image_table(),
            }
            results["bundles"].append(clean(entry))
            if want_figures:
                fig_data.append(figure_data(ev, threshold))
            del ev
            prog.advance(total)
    if out_dir is not None:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            write_results(results, tmp)
            if want_figures:
                figs = tmp / "figures"
                for name, fd in zip(file_names, fig_data, strict=True):
                    bundle_figures(fd, name, figs)
                rows = [_with_means(summary_row(b)) for b in results["bundles"]]
                summary_figure(rows, figs / "summary.png")
    return results


def _with_means(row: dict[str, Any]) -> dict[str, Any]:
    """Add the mean over shifts of the EU and AU AUROCs (for the summary figure)."""
    for m in ("eu", "au"):
        vals = [
            v
            for k, v in row.items()
            if k.startswith(f"auroc_{m}_") and k != f"auroc_{m}_all" and v is not None
        ]
        row[f"auroc_{m}_mean"] = float(np.mean(vals)) if vals else None
    return row


def calibrate(
    bundle: str | os.PathLike[str],
    data: str | os.PathLike[str] = "synthetic",
    *,
    servers: Sequence[str] | None = None,
    device: str = "auto",
    n_test: int = 32,
    n_val: int = 32,
    n_ood: int = 16,
    size: Sequence[int] | None = None,
    shifts: Sequence[str] | None = None,
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    seed: int = 0,
    quantile: float = 0.95,
    progress: bool = False,
) -> Manifest:
    """Calibrate ``bundle`` in place on validation data; return the new manifest.

    - default aggregator: the one whose image-level EU separates the ID from
      the OOD validation sets best (AUROC; ties go to the earlier of
      ``border mean patch threshold foreground``);
    - OOD threshold: the ``quantile`` of image-level EU on the ID validation
      set (``val``), under that aggregator;
    - ``entanglement``: the bundle's Δ scores and AU-EU rank correlation;
      ``validation``: the statistics they came from.

    The manifest gets ``manifest_version + 1``; the old one is kept as
    ``manifest.v<N>.json``; member checksums are verified before and after.
    Bundles with one member (no EU method) get no OOD threshold: their EU is
    0 in ``predict``.
    """
    b = load_bundle(bundle)
    if not 0.0 < quantile < 1.0:
        raise EvaluationError(f"quantile must lie in (0, 1), got {quantile}")
    options = _data_options(n_test, n_val, n_ood, size, shifts, severities, seed)
    source = source_for(b, data, options)
    prog = _Progress(progress)
    with prog.session():
        task = prog.task(
            f"{b.manifest.name} ({b.manifest.combination})", 1 + len(source.sets("calibration"))
        )
        ev = run_bundle(
            b,
            source,
            split="calibration",
            servers=servers,
            device=device,
            progress=prog,
            bundle_task=task,
            seed=seed + b.manifest.seed,
        )
    summary = ev.summary()
    man = b.manifest
    by_agg = summary["ood_auroc_eu_by_aggregator"]
    delta = summary["delta"]
    ood = man.ood
    default_aggregator = man.default_aggregator
    validation: dict[str, Any] = {
        "calibrated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "uqserve_version": __version__,
        "data": source.description,
        "ood_auroc_eu_by_aggregator": by_agg,
        # The `threshold` aggregator's cut-offs per map, set on the ID validation set
        # (predict reads this key).
        "thresholds": ev.predict_thresholds(),
        "platt": summary["platt"],
        "id": {
            k: summary["splits"]["id"].get(k)
            for k in ("dice", "ece", "ged2", "hm_iou", "ncc_au", "ace_tu")
        },
    }
    if ev.convention == UQSERVE:
        finite = {k: v for k, v in by_agg.items() if v is not None and math.isfinite(v)}
        if not finite:
            raise EvaluationError(
                f"{b.path}: no aggregator gave a finite OOD AUROC; check the data"
            )
        best = max(finite.values())
        default_aggregator = next(a for a in AGGREGATORS if finite.get(a) == best)
        val_scores = ev.scores("val", "eu", default_aggregator)
        tau = U.calibrate_ood_threshold(val_scores, quantile)
        ood = OODSpec(
            aggregator=default_aggregator,
            threshold=float(tau),
            quantile=float(quantile),
            validation_scores=tuple(float(v) for v in np.sort(val_scores)),
        )
        validation["ood_auroc_eu"] = best
        validation["n_validation_scores"] = int(val_scores.size)
    else:
        validation["ood"] = "no EU method (one member): predict reports EU = 0 and no OOD flag"
    entanglement = {
        "delta_ood": delta.get("ood"),
        "delta_ambiguity": delta.get("ambiguity"),
        "delta_calibration": delta.get("calibration"),
        "delta_mean": delta.get("mean"),
        "rank_correlation": delta.get("rank_correlation"),
        "convention": summary["convention"],
        "note": delta.get("note", ""),
        "aggregator": summary["aggregator"],
        "data": source.description.get("source"),
    }
    new = dataclasses.replace(
        man,
        default_aggregator=default_aggregator,
        ood=ood,
        validation=clean(validation),
        entanglement=clean(entanglement),
        manifest_version=man.manifest_version + 1,
    )
    _write_new_manifest(b, new)
    return new


def _write_new_manifest(b: Bundle, new: Manifest) -> None:
    """Keep ``manifest.v<N>.json``, then replace ``manifest.json`` atomically."""
    verify_checksums(b)  # members must not have changed while we ran
    old_version = b.manifest.manifest_version
    backup = b.path / f"manifest.v{old_version}.json"
    fd, tmp = tempfile.mkstemp(prefix=".manifest-backup-", suffix=".json", dir=b.path)
    os.close(fd)
    try:
        shutil.copyfile(b.path / MANIFEST_NAME, tmp)
        os.replace(tmp, backup)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_manifest(b.path, new)
    verify_checksums(Bundle(path=b.path, manifest=new))
