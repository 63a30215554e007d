"""Evaluate bundles: downstream metrics, OOD detection and the entanglement scores Δ.

``evaluate`` runs bundles over in-distribution test sets with several
annotators (low and high ambiguity) and over OOD sets of every shift and
severity, and reports every downstream metric, the paper's entanglement
scores Δ and the AU-EU rank correlation. ``calibrate`` (from
:mod:`uqserve.calibration`, importable from here) picks a bundle's default
aggregator and OOD threshold and records them in a new manifest version.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uqserve import uncertainty as U
from uqserve._progress import ProgressFn
from uqserve._version import __version__
from uqserve.bundle import (
    Bundle,
    load_bundle,
)
from uqserve.calibration import calibrate
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
from uqserve.evaluation.paper import rank_scores
from uqserve.evaluation.report import (
    atomic_dir,
    clean,
    markdown_table,
    names_unique,
    summary_row,
    write_results,
)
from uqserve.evaluation.runner import bundle_info, run_bundle, source_for
from uqserve.evaluation.sets import (
    DEFAULT_SEVERITIES,
    DataSource,
    EvalImage,
    EvaluationError,
    SetSpec,
    data_options,
)

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
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Evaluate each bundle; return the results and, with ``out_dir``, write them.

    ``data`` is ``"synthetic"`` or a folder in the format ``uqserve train``
    reads (images + per-annotator label maps). Synthetic images default to
    each bundle's tile size. ``out_dir`` receives ``results.json``,
    ``results.csv`` (tidy), ``results.md`` and ``figures/*.png``; it is
    written atomically (temp folder, then rename).

    ``progress(task, done, total)`` reports bundles done (``task``
    ``"bundles"``), each bundle's sets and each set's images.

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
    options = data_options(n_test, n_val, n_ood, size, shifts, severities, seed)
    # Everything a user can get wrong is checked before the first image runs.
    loaded = [load_bundle(b) for b in bundles]
    sources = [source_for(b, data, options) for b in loaded]
    if out_dir is not None:
        out = Path(out_dir)
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise EvaluationError(
                f"{out}: folder exists and is not empty; pass `overwrite=True` or another `out_dir`"
            )
    want_figures = figures and out_dir is not None
    if want_figures and not matplotlib_available():
        raise EvaluationError(
            "figures need matplotlib: pip install 'uqserve[eval]', or pass `figures=False`"
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
    if progress is not None:
        progress("bundles", 0, len(loaded))
    for bundle, source in zip(loaded, sources, strict=True):
        entry, figs = _evaluate_bundle(
            bundle, source, servers=servers, device=device, aggregator=aggregator,
            seed=seed, progress=progress, want_figures=want_figures,
        )  # fmt: skip
        results["bundles"].append(entry)
        fig_data += figs
        if progress is not None:
            progress("bundles", len(results["bundles"]), len(loaded))
    results["ranks"] = _ranks(results["bundles"])
    if out_dir is not None:
        _write(results, fig_data, file_names, out_dir, overwrite=overwrite)
    return results


def _ranks(bundles: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's PERFRANK/ENTRANK among the evaluated bundles with Δ (one seed's ranks)."""
    scored = {
        b["name"]: b["results"]["delta"]["paper"]
        for b in bundles
        if b["results"]["delta"].get("paper") is not None
    }
    return clean(rank_scores(scored)) if len(scored) >= 2 else {}


def _evaluate_bundle(
    bundle: Bundle,
    source: DataSource,
    *,
    servers: Sequence[str] | None,
    device: str,
    aggregator: str,
    seed: int,
    progress: ProgressFn | None,
    want_figures: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One bundle's results entry, and its figure data when ``want_figures``."""
    t0 = time.perf_counter()
    ev = run_bundle(
        bundle,
        source,
        servers=servers,
        device=device,
        aggregator=aggregator,
        progress=progress,
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
    return clean(entry), [figure_data(ev, threshold)] if want_figures else []


def _write(
    results: dict[str, Any],
    fig_data: list[dict[str, Any]],
    file_names: list[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool,
) -> None:
    """results.json/.csv/.md and the figures, into ``out_dir`` atomically."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_results(results, tmp)
        if fig_data:
            figs = tmp / "figures"
            for name, fd in zip(file_names, fig_data, strict=True):
                bundle_figures(fd, name, figs)
            rows = [_with_means(summary_row(b)) for b in results["bundles"]]
            summary_figure(rows, figs / "summary.png")


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
