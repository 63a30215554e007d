"""Calibrate a bundle: default aggregator, OOD threshold, validation statistics, Δ scores.

One calibration for both paths: ``uqserve export`` calibrates the bundle it
writes (:func:`calibrate_bundle`, handed to the exporter: :func:`calibrate_manifest`
with :data:`EXPORT_CALIBRATION`), and
``uqserve calibrate`` recalibrates a bundle in place (:func:`calibrate`). Both
run the bundle through the :class:`~uqserve.runtime.Runtime` interface
(embedded onnxruntime, or Triton servers) over the evaluation sets of
:mod:`uqserve.evaluation` and write the same ``manifest.validation`` keys
(:data:`VALIDATION_KEYS`):

- ``default_aggregator`` (and ``ood.aggregator``): the aggregator whose
  image-level EU separates the ID test images from the OOD images best
  (AUROC). **Tie-break**: AUROCs are compared rounded to 6 decimals; equal
  ones go to the earliest in ``uqserve.contracts.AGGREGATORS`` (``border``,
  the paper's, then ``mean patch threshold foreground``);
- ``ood.threshold``: the ``quantile`` of the image-level EU of the ID
  validation images (``val``) under that aggregator;
- ``validation``: the statistics they came from; ``entanglement``: the
  bundle's Δ scores and AU-EU rank correlation.

Bundles with one member (no EU method) keep no OOD threshold: their EU is 0.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uqserve import uncertainty as U
from uqserve._fs import atomic_write_bytes
from uqserve._progress import ProgressFn
from uqserve._version import __version__
from uqserve.bundle import MANIFEST_NAME, Bundle, Manifest, OODSpec, load_bundle, verify_checksums
from uqserve.bundle import write_manifest as _write_manifest
from uqserve.contracts import AGGREGATORS, PAPER_SHIFTS
from uqserve.evaluation.core import UQSERVE, BundleEvaluation
from uqserve.evaluation.report import clean
from uqserve.evaluation.runner import run_bundle, source_for
from uqserve.evaluation.sets import DEFAULT_SEVERITIES, EvaluationError, data_options
from uqserve.runtime import Runtime

__all__ = [
    "EXPORT_CALIBRATION",
    "VALIDATION_KEYS",
    "best_aggregator",
    "calibrate",
    "calibrate_bundle",
    "calibrate_manifest",
]

#: The keys of ``manifest.validation`` after any calibration (export or ``uqserve calibrate``).
VALIDATION_KEYS = (
    "calibrated",
    "uqserve_version",
    "data",
    "quantile",
    "ood_auroc_eu_by_aggregator",
    "ood_auroc_eu",
    "n_validation_scores",
    "thresholds",
    "platt",
    "id",
    "note",
)

#: What ``uqserve export`` calibrates on: small synthetic sets under the paper's
#: four corruptions at one severity (about 70 slices: seconds on a CPU).
EXPORT_CALIBRATION: dict[str, Any] = {
    "n_test": 12,
    "n_val": 24,
    "n_ood": 6,
    "shifts": PAPER_SHIFTS,
    "severities": (0.7,),
}

_ID_STATS = ("dice", "ece", "ged2", "hm_iou", "ncc_au", "ace_tu")


def best_aggregator(auroc_by_aggregator: Mapping[str, float | None]) -> str | None:
    """The aggregator with the highest finite AUROC (None if none is finite).

    AUROCs are compared rounded to 6 decimals (float noise is no preference);
    ties go to the earliest in ``AGGREGATORS`` (``border`` first).
    """
    finite = {
        a: round(float(v), 6)
        for a, v in auroc_by_aggregator.items()
        if v is not None and math.isfinite(v)
    }
    if not finite:
        return None
    top = max(finite.values())
    return next(a for a in AGGREGATORS if finite.get(a) == top)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _evaluate(
    bundle: Bundle,
    data: str | os.PathLike[str],
    options: dict[str, Any],
    *,
    runtime: Runtime | None,
    servers: Sequence[str] | None,
    device: str,
    progress: ProgressFn | None,
) -> tuple[BundleEvaluation, dict[str, Any]]:
    """Run ``bundle`` over the validation set and the calibration split's sets."""
    source = source_for(bundle, data, options)
    man = bundle.manifest
    ev = run_bundle(
        bundle,
        source,
        split="calibration",
        runtime=runtime,
        servers=servers,
        device=device,
        progress=progress,
        seed=int(options["seed"]) + man.seed,
    )
    return ev, source.description


def calibrate_manifest(
    bundle: Bundle,
    data: str | os.PathLike[str] = "synthetic",
    *,
    runtime: Runtime | None = None,
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
    progress: ProgressFn | None = None,
) -> Manifest:
    """The calibrated manifest of ``bundle`` (nothing is written; see the module doc).

    ``data`` is ``"synthetic"`` or a folder in the format ``uqserve train``
    reads. ``runtime`` runs the members (default: Triton with ``servers``,
    else embedded on ``device``). Synthetic images default to the bundle's
    tile size. ``n_test`` ID images per ambiguity, ``n_val`` validation
    images, ``n_ood`` images per shift and severity.
    """
    if not 0.0 < quantile < 1.0:
        raise EvaluationError(f"quantile must lie in (0, 1), got {quantile}")
    options = data_options(n_test, n_val, n_ood, size, shifts, severities, seed)
    ev, description = _evaluate(
        bundle, data, options, runtime=runtime, servers=servers, device=device, progress=progress
    )
    summary = ev.summary()
    man = bundle.manifest
    by_agg = {a: _rounded(v) for a, v in summary["ood_auroc_eu_by_aggregator"].items()}
    validation: dict[str, Any] = {
        "calibrated": _now(),
        "uqserve_version": __version__,
        "data": description,
        "quantile": float(quantile),
        "ood_auroc_eu_by_aggregator": by_agg,
        "ood_auroc_eu": None,
        "n_validation_scores": 0,
        # The `threshold` aggregator's cut-offs per map, set on the ID validation
        # set (predict reads this key).
        "thresholds": ev.predict_thresholds(),
        "platt": summary["platt"],
        "id": {k: summary["splits"]["id"].get(k) for k in _ID_STATS},
        "note": "",
    }
    ood, default_aggregator = man.ood, man.default_aggregator
    if ev.convention == UQSERVE:
        best = best_aggregator(by_agg)
        if best is None:
            raise EvaluationError(
                f"{bundle.path}: no aggregator gave a finite OOD AUROC; check the data"
            )
        default_aggregator = best
        val_scores = ev.scores("val", "eu", best)
        ood = OODSpec(
            aggregator=best,
            threshold=float(U.calibrate_ood_threshold(val_scores, quantile)),
            quantile=float(quantile),
            validation_scores=tuple(float(v) for v in np.sort(val_scores)),
        )
        validation["ood_auroc_eu"] = by_agg[best]
        validation["n_validation_scores"] = int(val_scores.size)
    else:
        ood = OODSpec(aggregator=default_aggregator, quantile=float(quantile))
        validation["note"] = "no EU method (one member): predict reports EU = 0 and no OOD flag"
    return dataclasses.replace(
        man,
        default_aggregator=default_aggregator,
        ood=ood,
        validation=clean(validation),
        entanglement=clean(_entanglement(summary, description)),
    )


def calibrate_bundle(bundle: Bundle, **options: Any) -> Manifest:
    """Calibrate a freshly exported bundle (:data:`EXPORT_CALIBRATION`); the new manifest.

    What ``uqserve export`` hands to the exporter (``calibrate=calibrate_bundle``).
    Synthetic slices are drawn at the training image size when the export
    recorded one (``extra.calibration_size``: the same object scale as in
    training), else at the tile size. ``options`` override
    :func:`calibrate_manifest`'s.
    """
    man = bundle.manifest
    cal, mult = int(man.extra.get("calibration_size") or 0), man.input.multiple
    size = (cal - cal % mult, cal - cal % mult) if cal >= mult else man.input.tile_size
    kwargs: dict[str, Any] = {"size": size, "device": "cpu", **EXPORT_CALIBRATION, **options}
    return calibrate_manifest(bundle, **kwargs)


def _rounded(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def _entanglement(summary: dict[str, Any], description: dict[str, Any]) -> dict[str, Any]:
    delta = summary["delta"]
    return {
        "auroc_au_paper": delta.get("auroc_au_paper"),
        "auroc_eu_paper": delta.get("auroc_eu_paper"),
        "delta_ood": delta.get("ood"),
        "delta_ambiguity": delta.get("ambiguity"),
        "delta_calibration": delta.get("calibration"),
        "delta_mean": delta.get("mean"),
        "rank_correlation": delta.get("rank_correlation"),
        "convention": summary["convention"],
        "note": delta.get("note", ""),
        "aggregator": summary["aggregator"],
        "data": description.get("source"),
    }


def calibrate(
    bundle: str | os.PathLike[str],
    data: str | os.PathLike[str] = "synthetic",
    **options: Any,
) -> Manifest:
    """Calibrate ``bundle`` in place; return the new manifest.

    ``options`` are those of :func:`calibrate_manifest`. The manifest gets
    ``manifest_version + 1``; the old one is kept as ``manifest.v<N>.json``;
    member checksums are verified before and after.
    """
    b = load_bundle(bundle)
    new = calibrate_manifest(b, data, **options)
    new = dataclasses.replace(new, manifest_version=b.manifest.manifest_version + 1)
    _write_new_manifest(b, new)
    return new


def _write_new_manifest(b: Bundle, new: Manifest) -> None:
    """Keep ``manifest.v<N>.json``, then replace ``manifest.json`` atomically."""
    verify_checksums(b)  # members must not have changed while we ran
    backup = b.path / f"manifest.v{b.manifest.manifest_version}.json"
    atomic_write_bytes(backup, (b.path / MANIFEST_NAME).read_bytes())
    _write_manifest(b.path, new)
    verify_checksums(Bundle(path=b.path, manifest=new))
