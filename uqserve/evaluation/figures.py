"""PNG figures of an evaluation (matplotlib, the ``eval`` extra).

Per bundle: reliability diagram, image-level AU vs EU scatter coloured by
set, OOD score histograms with the threshold, and a grid of samples against
the annotators. Across bundles: a summary of the Δ scores and OOD AUROCs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.evaluation.core import BundleEvaluation

_COLOURS = {"id-low": "#1f77b4", "id-high": "#ff7f0e", "id": "#1f77b4", "ood": "#d62728"}


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_bins(
    prob: npt.NDArray[np.float32], annotations: npt.NDArray[np.uint8], n_bins: int = 15
) -> dict[str, list[float]]:
    """Confidence (max p̄) vs accuracy (averaged over annotators) in equal-width bins.

    prob ``[K, V]``, annotations ``[A, V]``. For plotting only: ECE itself comes
    from ``uqserve.metrics.ece``.
    """
    conf = prob.max(axis=0)
    pred = prob.argmax(axis=0)
    acc = (annotations == pred[None]).mean(axis=0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {
        "edges": edges.tolist(),
        "conf": (np.bincount(idx, conf, n_bins) / safe).tolist(),
        "acc": (np.bincount(idx, acc, n_bins) / safe).tolist(),
        "count": count.tolist(),
    }


def figure_data(ev: BundleEvaluation, threshold: float | None) -> dict[str, Any]:
    """What the figures need from one evaluation (small: bins, scores, a few examples)."""
    id_sets = [n for n, s in ev.specs.items() if s.kind == "id"]
    pool_prob = np.concatenate([np.concatenate(ev.pools[n].prob, axis=1) for n in id_sets], axis=1)
    a = min(x.shape[0] for n in id_sets for x in ev.pools[n].annotations)
    pool_ann = np.concatenate([x[:a] for n in id_sets for x in ev.pools[n].annotations], axis=1)
    examples: list[tuple[str, dict[str, Any]]] = []
    preferred: list[str] = [n for n in ("id-high", "id", "id-low") if n in ev.examples]
    ood = [n for n, s in ev.specs.items() if s.kind == "ood" and n in ev.examples]
    for n in preferred[:1]:
        examples += [(n, e) for e in ev.examples[n][:2]]
    for n in ood[-1:]:
        examples += [(n, e) for e in ev.examples[n][:1]]
    return {
        "reliability": reliability_bins(pool_prob, pool_ann),
        "images": [r for r in ev.image_table() if r["kind"] != "val"],
        "examples": examples,
        "threshold": threshold,
        "aggregator": ev.aggregator,
    }


def _set_colour(set_name: str, kind: str) -> str:
    return _COLOURS.get(set_name, _COLOURS["ood"] if kind == "ood" else "#2ca02c")


def plot_reliability(data: dict[str, Any], title: str, path: Path) -> Path:
    plt = _plt()
    rel = data["reliability"]
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    edges = np.asarray(rel["edges"])
    count = np.asarray(rel["count"])
    acc = np.where(count > 0, rel["acc"], np.nan)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ax.bar(centres, acc, width=np.diff(edges), edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence (max p̄)")
    ax.set_ylabel("accuracy (vs each annotator)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: reliability (ID)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_au_eu(data: dict[str, Any], title: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    groups: dict[str, list[tuple[float, float]]] = {}
    kinds: dict[str, str] = {}
    for r in data["images"]:
        key = "ood" if r["kind"] == "ood" else r["set"]
        kinds[key] = r["kind"]
        groups.setdefault(key, []).append((r["au"], r["eu"]))
    for key, pts in groups.items():
        xy = np.asarray(pts, np.float64)
        label = {
            "id-low": "ID, low ambiguity",
            "id-high": "ID, high ambiguity",
            "id": "ID",
            "ood": "OOD (all shifts)",
        }
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            s=8,
            alpha=0.6,
            c=_set_colour(key, kinds[key]),
            label=label.get(key, key),
        )
    if data.get("threshold") is not None:
        ax.axhline(data["threshold"], color="k", lw=0.8, ls=":", label="OOD threshold")
    ax.set_xlabel(f"image-level AU ({data['aggregator']})")
    ax.set_ylabel(f"image-level EU ({data['aggregator']})")
    ax.set_title(f"{title}: AU vs EU", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ood_hist(data: dict[str, Any], title: str, path: Path) -> Path:
    plt = _plt()
    rows = data["images"]
    id_eu = np.asarray([r["eu"] for r in rows if r["kind"] == "id"], np.float64)
    shifts: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "ood":
            shift = r["set"].split("-")[1] if r["set"].count("-") >= 2 else r["set"]
            shifts.setdefault(shift, []).append(r["eu"])
    n = max(len(shifts), 1)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 2.4 * nrows), dpi=100, squeeze=False)
    finite = np.concatenate([id_eu, *[np.asarray(v) for v in shifts.values()]]) if shifts else id_eu
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    bins = np.linspace(lo, hi, 25)
    for ax, (shift, vals) in zip(axes.flat, shifts.items() or [("none", [])], strict=False):
        ax.hist(id_eu, bins=bins, alpha=0.6, color=_COLOURS["id"], label="ID", density=True)
        if vals:
            ax.hist(vals, bins=bins, alpha=0.6, color=_COLOURS["ood"], label=shift, density=True)
        if data.get("threshold") is not None:
            ax.axvline(data["threshold"], color="k", lw=1, ls="--", label="threshold")
        ax.set_title(shift, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shifts) or 1 :]:
        ax.axis("off")
    fig.suptitle(f"{title}: image-level EU ({data['aggregator']}), ID vs OOD", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_samples(data: dict[str, Any], title: str, path: Path) -> Path:
    plt = _plt()
    examples = data["examples"]
    if not examples:
        return path
    n_ann = max(min(e["annotations"].shape[0], 4) for _, e in examples)
    n_smp = max(0 if e["samples"] is None else min(e["samples"].shape[0], 4) for _, e in examples)
    ncols = 1 + n_ann + n_smp + 3
    fig, axes = plt.subplots(
        len(examples),
        ncols,
        figsize=(1.3 * ncols, 1.4 * len(examples) + 0.3),
        dpi=100,
        squeeze=False,
    )
    for row, (set_name, e) in zip(axes, examples, strict=True):
        panels: list[tuple[str, Any, str]] = [(f"{set_name}", e["image"], "gray")]
        panels += [
            (f"annot. {a + 1}", e["annotations"][a], "viridis")
            for a in range(min(e["annotations"].shape[0], 4))
        ]
        if e["samples"] is not None:
            panels += [
                (f"sample {s + 1}", e["samples"][s], "viridis")
                for s in range(min(e["samples"].shape[0], 4))
            ]
        panels += [("TU", e["tu"], "magma"), ("AU", e["au"], "magma"), ("EU", e["eu"], "magma")]
        for ax in row:
            ax.axis("off")
        for ax, (label, img, cmap) in zip(row, panels, strict=False):
            ax.imshow(img, cmap=cmap, interpolation="nearest")
            ax.set_title(label, fontsize=6)
    fig.suptitle(f"{title}: samples vs annotators", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bundle_figures(data: dict[str, Any], name: str, folder: Path) -> list[Path]:
    """All per-bundle figures into ``folder``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_reliability(data, name, folder / f"{name}_reliability.png"),
        plot_au_eu(data, name, folder / f"{name}_au_eu.png"),
        plot_ood_hist(data, name, folder / f"{name}_ood_hist.png"),
        plot_samples(data, name, folder / f"{name}_samples.png"),
    ]


def summary_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars of the three Δ scores and the mean OOD AUROC of EU vs AU per bundle."""
    plt = _plt()
    names = [r["combination"] if r.get("combination") else r["bundle"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rows) + 4), 3.6), dpi=100)
    width = 0.26
    for i, (key, label) in enumerate(
        (
            ("delta_ood", "Δ OOD"),
            ("delta_ambiguity", "Δ ambiguity"),
            ("delta_calibration", "Δ calibration"),
        )
    ):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax1.bar(x + (i - 1) * width, vals, width, label=label)
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax1.set_ylabel("Δ (1 = disentangled, 0 = entangled)")
    ax1.legend(fontsize=7)
    ax1.set_title("entanglement scores", fontsize=9)
    eu = [np.nan if r.get("auroc_eu_mean") is None else r["auroc_eu_mean"] for r in rows]
    au = [np.nan if r.get("auroc_au_mean") is None else r["auroc_au_mean"] for r in rows]
    ax2.bar(x - 0.2, eu, 0.4, label="EU")
    ax2.bar(x + 0.2, au, 0.4, label="AU")
    ax2.axhline(0.5, color="k", lw=0.8, ls=":")
    ax2.set_ylim(0, 1)
    ax2.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("OOD AUROC (mean over shifts)")
    ax2.legend(fontsize=7)
    ax2.set_title("OOD detection", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
