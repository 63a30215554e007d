"""The evaluation core: per-image predictions in, every metric and Δ score out.

The core knows nothing about runtimes or files. ``BundleEvaluation`` takes one
``ImagePrediction`` per image (arrays) for the validation set first, then for
the test sets, and ``summary()`` computes the downstream metrics
and the entanglement scores Δ with ``uqserve.metrics`` and
``uqserve.uncertainty``. The runner feeds it from the bundle's member graphs;
tests feed it known predictions.

Memory stays bounded: per image it keeps a few scalars and a fixed-size
deterministic subsample of voxels (for the pooled ECE / ACE statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve import metrics as M
from uqserve import uncertainty as U
from uqserve.contracts import AGGREGATORS, DEFAULT_AGGREGATOR, PAPER_SHIFTS
from uqserve.evaluation.paper import paper_scores
from uqserve.evaluation.sets import EvalImage, EvaluationError, SetSpec

MAPS = ("tu", "au", "eu")
PAPER_AGGREGATOR = DEFAULT_AGGREGATOR

# Conventions for the rows of the AU x EU grid.
UQSERVE = "uqserve"
PAPER = "paper convention"
NO_EU = "no EU method"
CONVENTION_NOTES = {
    UQSERVE: "TU/AU/EU as decomposed by uqserve (mutual information over members)",
    PAPER: "paper convention: no EU method, each AU sample treated as a member, "
    "so AU = AU_sample and 'EU' = AU_latent",
    NO_EU: "no EU method and one sample: EU = 0 everywhere, Δ undefined "
    "(the paper excludes this row)",
}


def convention_for(num_members: int, num_samples: int) -> str:
    """Which convention a bundle's row follows: uqserve, paper convention, or no EU."""
    if num_members > 1:
        return UQSERVE
    return PAPER if num_samples > 1 else NO_EU


FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ImagePrediction:
    """A model's output for one 2D image, maps already in the row's convention.

    prob     ``[K, H, W]`` float32, p̄ (mean over members and samples)
    tu/au/eu ``[H, W]`` float32, nats
    samples  ``[M, S, H, W]`` uint8 argmax labels of every (member, sample), or None
    member_foreground ``[H, W]`` bool, voxels where any member's argmax is
             foreground (the ``foreground`` aggregator), or None
    au_sample/au_latent ``[H, W]`` float32, uqserve's own split of AU (for the
             thresholds ``calibrate`` records for predict), or None
    """

    prob: FloatArray
    tu: FloatArray
    au: FloatArray
    eu: FloatArray
    samples: npt.NDArray[np.uint8] | None = None
    member_foreground: npt.NDArray[np.bool_] | None = None
    au_sample: FloatArray | None = None
    au_latent: FloatArray | None = None

    @property
    def seg(self) -> npt.NDArray[np.uint8]:
        return np.argmax(self.prob, axis=0).astype(np.uint8)

    def map(self, name: str) -> FloatArray:
        return {"tu": self.tu, "au": self.au, "eu": self.eu}[name]


def to_convention(
    convention: str,
    *,
    tu: FloatArray,
    au: FloatArray,
    eu: FloatArray,
    au_sample: FloatArray,
    au_latent: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The ``(TU, AU, EU)`` maps that a row of the grid is evaluated with.

    ``paper convention`` (M = 1, S > 1): AU = AU_sample, EU = AU_latent.
    Otherwise uqserve's decomposition unchanged (for ``no EU method``: EU = 0).
    """
    if convention == PAPER:
        return tu, au_sample, au_latent
    return tu, au, eu


@dataclass
class ImageRecord:
    """Per-image results: scalars only."""

    name: str
    set: str
    dice: float
    ged2: float
    ged2_paper: float
    hm_iou: float
    ncc: dict[str, float]
    disagreement: float
    foreground_fraction: float
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class _Pool:
    """A bounded subsample of voxels for pooled (voxel-level) metrics.

    prob ``[K, V]``, annotations ``[A, V]``, maps ``[3, V]`` (tu, au, eu).
    """

    prob: list[FloatArray] = field(default_factory=list)
    annotations: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    maps: list[FloatArray] = field(default_factory=list)

    def add(
        self, pred: ImagePrediction, annotations: npt.NDArray[np.uint8], idx: npt.NDArray[np.intp]
    ) -> None:
        k = pred.prob.shape[0]
        self.prob.append(pred.prob.reshape(k, -1)[:, idx].astype(np.float32))
        self.annotations.append(
            annotations.reshape(annotations.shape[0], -1)[:, idx].astype(np.uint8)
        )
        self.maps.append(np.stack([pred.map(m).reshape(-1)[idx] for m in MAPS]).astype(np.float32))

    def arrays(self) -> tuple[FloatArray, npt.NDArray[np.uint8], FloatArray]:
        if not self.prob:
            raise EvaluationError("no images were evaluated in this set")
        # Annotator counts may differ between images of a user's folder: keep the common ones.
        a = min(x.shape[0] for x in self.annotations)
        return (
            np.concatenate(self.prob, axis=1),
            np.concatenate([x[:a] for x in self.annotations], axis=1),
            np.concatenate(self.maps, axis=1),
        )

    def correctness(self) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """Maps ``[3, V]`` and correctness ``[A, V]`` (annotator label == prediction)."""
        prob, ann, maps = self.arrays()
        pred = np.argmax(prob, axis=0)
        return maps, ann == pred[None]


def _mean(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(arr.mean()) if arr.size else math.nan


def _flat_samples(samples: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return samples.reshape(-1, *samples.shape[-2:])


class BundleEvaluation:
    """Accumulates one bundle's predictions over the sets and summarises them.

    Feed ``add(spec, image, prediction)`` for every validation image
    (``spec.kind == "val"``) first, call ``finish_validation()``, then feed
    the test sets; ``summary()`` returns the JSON-ready results.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        convention: str = UQSERVE,
        aggregator: str = PAPER_AGGREGATOR,
        voxels_per_image: int = 4096,
        keep_examples: int = 3,
        seed: int = 0,
    ) -> None:
        if aggregator not in AGGREGATORS:
            raise EvaluationError(
                f"unknown aggregator {aggregator!r}; choose from {', '.join(AGGREGATORS)}"
            )
        if convention not in CONVENTION_NOTES:
            raise EvaluationError(f"unknown convention {convention!r}")
        self.num_classes = num_classes
        self.convention = convention
        self.aggregator = aggregator
        self.voxels_per_image = int(voxels_per_image)
        self.keep_examples = keep_examples
        self.seed = seed
        self.specs: dict[str, SetSpec] = {}
        self.records: dict[str, list[ImageRecord]] = {}
        self.pools: dict[str, _Pool] = {}
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.thresholds: dict[str, float] | None = None
        self.platt: dict[str, tuple[float, float] | None] = {}
        # Validation maps are kept until the thresholds of the `threshold`
        # aggregator are known (n_val images; the test sets stream).
        self._val_maps: list[tuple[ImageRecord, ImagePrediction]] = []
        self._val_extra: list[FloatArray] = []
        self.extra_thresholds: dict[str, float] = {}

    # -- feeding -----------------------------------------------------------------------------
    def add(self, spec: SetSpec, image: EvalImage, pred: ImagePrediction) -> ImageRecord:
        """Score one image of ``spec`` and keep what the summary needs."""
        ann = image.annotations
        if pred.prob.shape[0] != self.num_classes:
            raise EvaluationError(
                f"prediction has {pred.prob.shape[0]} classes, expected {self.num_classes}"
            )
        if ann.shape[1:] != pred.prob.shape[1:]:
            raise EvaluationError(
                f"{image.name}: annotations {ann.shape[1:]} do not match "
                f"the prediction {pred.prob.shape[1:]}"
            )
        if spec.kind != "val" and self.thresholds is None:
            raise EvaluationError(
                "call finish_validation() after the validation set, before the test sets"
            )
        self.specs.setdefault(spec.name, spec)
        record = self._record(spec, image, pred)
        self.records.setdefault(spec.name, []).append(record)
        pool = self.pools.setdefault(spec.name, _Pool())
        idx = self._voxel_index(image, pred.prob.shape[1:])
        pool.add(pred, ann, idx)
        if spec.kind == "val":
            self._val_maps.append((record, pred))
            if pred.au_sample is not None and pred.au_latent is not None:
                self._val_extra.append(
                    np.stack([pred.au_sample.reshape(-1)[idx], pred.au_latent.reshape(-1)[idx]])
                )
        else:
            self._score(record, pred)
        ex = self.examples.setdefault(spec.name, [])
        if len(ex) < self.keep_examples:
            ex.append(_example(image, pred))
        return record

    def _voxel_index(self, image: EvalImage, shape: Sequence[int]) -> npt.NDArray[np.intp]:
        n = int(np.prod(shape))
        if n <= self.voxels_per_image:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, image.index, n])
        return np.sort(rng.choice(n, self.voxels_per_image, replace=False))

    def _record(self, spec: SetSpec, image: EvalImage, pred: ImagePrediction) -> ImageRecord:
        ann = image.annotations
        seg = pred.seg
        if pred.samples is not None:
            samples = pred.samples
            flat = _flat_samples(samples)
            ged2 = float(M.ged2(flat, ann))
            ged2_paper = float(M.ged2_paper(samples, ann))
            hm = float(M.hungarian_iou(flat, ann))
        else:
            ged2 = ged2_paper = hm = math.nan
        return ImageRecord(
            name=image.name,
            set=spec.name,
            dice=float(np.mean(M.dice(seg, ann, num_classes=self.num_classes))),
            ged2=ged2,
            ged2_paper=ged2_paper,
            hm_iou=hm,
            ncc={m: float(M.ncc(pred.map(m), ann)) for m in MAPS},
            disagreement=float(M.annotator_disagreement(ann)),
            foreground_fraction=float(np.mean(seg > 0)),
        )

    def _score(self, record: ImageRecord, pred: ImagePrediction) -> None:
        scorer = U.ImageScorer(seg=pred.seg, member_foreground=pred.member_foreground)
        for m in MAPS:
            u = pred.map(m)
            scores = {}
            for agg in AGGREGATORS:
                if agg == "foreground" and pred.member_foreground is None:
                    scores[agg] = math.nan  # the runtime did not say where members saw foreground
                    continue
                thr = (self.thresholds or {}).get(m) if agg == "threshold" else None
                scores[agg] = scorer.score(u, agg, threshold=thr)
            record.scores[m] = scores

    def finish_validation(self) -> None:
        """Fix the validation-derived constants, then score the validation images.

        - thresholds of the ``threshold`` aggregator, per map: the quantile
          ``1 - mean foreground fraction`` of the pooled validation map values
          (as in the paper's code);
        - Platt scaling ``(a, b)`` per map for ACE.
        """
        if "val" not in self.pools:
            raise EvaluationError("the validation set is empty; evaluate needs validation images")
        recs = self.records["val"]
        q = 1.0 - _mean(r.foreground_fraction for r in recs)
        q = min(max(q, 0.0), 1.0)
        _, _, maps = self.pools["val"].arrays()
        self.thresholds = {m: float(np.quantile(maps[i], q)) for i, m in enumerate(MAPS)}
        if self._val_extra:
            extra = np.concatenate(self._val_extra, axis=1)
            self.extra_thresholds = {
                "au_sample": float(np.quantile(extra[0], q)),
                "au_latent": float(np.quantile(extra[1], q)),
            }
            self._val_extra.clear()
        u, correct = self.pools["val"].correctness()
        for i, m in enumerate(MAPS):
            self.platt[m] = _platt(u[i], correct)
        for record, pred in self._val_maps:
            self._score(record, pred)
        self._val_maps.clear()

    def predict_thresholds(self) -> dict[str, float]:
        """Cut-offs of the ``threshold`` aggregator for predict's maps.

        Stored as ``manifest.validation["thresholds"]`` (predict reads that key).

        predict keeps uqserve's honest decomposition; in the paper convention
        this evaluation's AU/EU are predict's AU_sample/AU_latent, and
        predict's AU equals TU and its EU is 0 (one member).
        """
        if self.thresholds is None:
            raise EvaluationError("finish_validation() was not called")
        t = self.thresholds
        if self.convention == PAPER:
            return {
                "tu": t["tu"],
                "au": t["tu"],
                "eu": 0.0,
                "au_sample": t["au"],
                "au_latent": t["eu"],
            }
        return {**t, **self.extra_thresholds}

    # -- summaries ---------------------------------------------------------------------------
    def scores(self, set_name: str, map_name: str, aggregator: str | None = None) -> FloatArray:
        """Image-level scores ``[N]`` of one set (default: the evaluation aggregator)."""
        agg = aggregator or self.aggregator
        return np.asarray(
            [r.scores[map_name][agg] for r in self.records.get(set_name, [])], np.float64
        )

    def _sets(self, kind: str) -> list[str]:
        return [n for n, s in self.specs.items() if s.kind == kind]

    def _id_scores(self, map_name: str, aggregator: str | None = None) -> FloatArray:
        return np.concatenate([self.scores(n, map_name, aggregator) for n in self._sets("id")])

    def _image_metrics(self, names: Sequence[str]) -> dict[str, float]:
        recs = [r for n in names for r in self.records[n]]
        au = np.asarray([r.scores["au"][self.aggregator] for r in recs])
        dis = np.asarray([r.disagreement for r in recs])
        out = {
            "n_images": float(len(recs)),
            "dice": _mean(r.dice for r in recs),
            "ged2": _mean(r.ged2 for r in recs),
            "ged2_paper": _mean(r.ged2_paper for r in recs),
            "hm_iou": _mean(r.hm_iou for r in recs),
            "disagreement": _mean(r.disagreement for r in recs),
            "ambiguity_spearman": _safe(M.ambiguity_correlation, au, dis, min_size=2),
        }
        for m in MAPS:
            out[f"ncc_{m}"] = _mean(r.ncc[m] for r in recs)
            out[f"mean_{m}"] = _mean(r.scores[m]["mean"] for r in recs)
        return out

    def _voxel_metrics(self, names: Sequence[str]) -> dict[str, float]:
        pool = _Pool()
        for n in names:
            p = self.pools[n]
            pool.prob += p.prob
            pool.annotations += p.annotations
            pool.maps += p.maps
        prob, ann, _ = pool.arrays()
        out = {"ece": _safe(M.ece, prob, ann)}
        u, correct = pool.correctness()
        for i, m in enumerate(MAPS):
            ab = self.platt.get(m)
            out[f"ace_{m}"] = math.nan if ab is None else _safe(M.ace, u[i], correct, ab[0], ab[1])
        return out

    def _ood_metrics(self, names: Sequence[str], aggregator: str | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in MAPS:
            s_in = self._id_scores(m, aggregator)
            s_out = np.concatenate([self.scores(n, m, aggregator) for n in names])
            out[f"auroc_{m}"] = _safe(M.auroc, s_in, s_out)
            out[f"fpr95_{m}"] = _safe(M.fpr_at_95_tpr, s_in, s_out)
        return out

    def ood_auroc_by_aggregator(self, map_name: str = "eu") -> dict[str, float]:
        """AUROC of image-level ``map_name`` (ID test vs all OOD sets) for each aggregator."""
        ood = self._sets("ood")
        out = {}
        for agg in AGGREGATORS:
            s_in = self._id_scores(map_name, agg)
            s_out = np.concatenate([self.scores(n, map_name, agg) for n in ood])
            out[agg] = _safe(M.auroc, s_in, s_out)
        return out

    def summary(self) -> dict[str, Any]:
        """Every metric per set, per split (``id``, ``ood``), per shift, and the Δ scores."""
        if self.thresholds is None:
            raise EvaluationError("finish_validation() was not called")
        id_sets, ood_sets = self._sets("id"), self._sets("ood")
        if not id_sets:
            raise EvaluationError("no in-distribution test images were evaluated")
        sets: dict[str, Any] = {}
        for name in id_sets + ood_sets:
            entry: dict[str, Any] = {"spec": self.specs[name].to_dict()}
            entry.update(self._image_metrics([name]))
            entry.update(self._voxel_metrics([name]))
            if name in ood_sets:
                entry.update(self._ood_metrics([name]))
            sets[name] = entry
        splits = {"id": {**self._image_metrics(id_sets), **self._voxel_metrics(id_sets)}}
        if ood_sets:
            splits["ood"] = {**self._image_metrics(ood_sets), **self._voxel_metrics(ood_sets)}
            splits["ood"].update(self._ood_metrics(ood_sets))
        shifts: dict[str, Any] = {}
        for shift in dict.fromkeys(self.specs[n].shift for n in ood_sets):
            names = [n for n in ood_sets if self.specs[n].shift == shift]
            shifts[str(shift)] = {
                **self._image_metrics(names),
                **self._voxel_metrics(names),
                **self._ood_metrics(names),
            }
        delta = self._deltas(splits, shifts)
        return {
            "convention": self.convention,
            "convention_note": CONVENTION_NOTES[self.convention],
            "aggregator": self.aggregator,
            "thresholds": self.thresholds,
            "platt": {m: None if v is None else list(v) for m, v in self.platt.items()},
            "sets": sets,
            "splits": splits,
            "shifts": shifts,
            "ood_auroc_eu_by_aggregator": self.ood_auroc_by_aggregator("eu") if ood_sets else {},
            "delta": delta,
        }

    def _deltas(self, splits: dict[str, Any], shifts: dict[str, Any]) -> dict[str, Any]:
        """The paper's Δ per task (``evaluation/paper.py``) and the AU-EU rank correlation."""
        au_scores, eu_scores = self._id_scores("au"), self._id_scores("eu")
        if self.convention == NO_EU:
            return {
                "ood": None,
                "ambiguity": None,
                "calibration": None,
                "mean": None,
                "rank_correlation": None,
                "note": CONVENTION_NOTES[NO_EU],
            }
        # Δ per shift, every shift (the paper's Δ below uses its four only).
        per_shift = {s: _safe(U.ood_delta, v["auroc_eu"], v["auroc_au"]) for s, v in shifts.items()}
        paper = paper_scores(splits["id"], shifts)
        return {
            "ood": paper["delta_ood"],
            "ambiguity": paper["delta_ambiguity"],
            "calibration": paper["delta_calibration"],
            "mean": paper["delta_mean"],
            "auroc_au_paper": paper["auroc_au_paper"],
            "auroc_eu_paper": paper["auroc_eu_paper"],
            "paper": paper,
            "ood_per_shift": per_shift,
            "rank_correlation": _safe(U.rank_correlation, au_scores, eu_scores, min_size=2),
            "note": "Δ: disentanglement; 1 = disentangled, 0 = entangled, "
            "< 0: the wrong type does better. OOD: AUROCs averaged over the paper's "
            f"shifts ({', '.join(PAPER_SHIFTS)}); ambiguity and calibration: mean of "
            "Δ on ID and Δ on the mean of those shifts.",
        }

    def image_table(self) -> list[dict[str, Any]]:
        """One row per test image: set, name and image-level TU/AU/EU (evaluation aggregator)."""
        rows = []
        for name, recs in self.records.items():
            for r in recs:
                rows.append(
                    {
                        "set": name,
                        "kind": self.specs[name].kind,
                        "name": r.name,
                        "disagreement": r.disagreement,
                        **{m: r.scores.get(m, {}).get(self.aggregator, math.nan) for m in MAPS},
                    }
                )
        return rows


def _example(image: EvalImage, pred: ImagePrediction) -> dict[str, Any]:
    """What the figures show of one image; a whole volume shows its middle slice ``[..., z]``."""
    ex: dict[str, Any] = {
        "name": image.name,
        "image": image.image[0],
        "annotations": image.annotations,
        "samples": None if pred.samples is None else _flat_samples(pred.samples)[:6],
        "seg": pred.seg,
        "tu": pred.tu,
        "au": pred.au,
        "eu": pred.eu,
    }
    if pred.prob.ndim == 4:  # [K, X, Y, Z]: a whole volume
        z = pred.prob.shape[-1] // 2
        ex = {k: v[..., z] if isinstance(v, np.ndarray) else v for k, v in ex.items()}
    return ex


def _platt(u: FloatArray, correct: npt.NDArray[np.bool_]) -> tuple[float, float] | None:
    try:
        a, b = M.platt_fit(u, correct)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError):
        return None
    return float(a), float(b)


def _safe(fn: Callable[..., float | None], *inputs: Any, min_size: int = 1) -> float:
    """``fn(*inputs)`` as a float, or NaN where the metric is undefined on its inputs.

    Undefined means: an input has fewer than ``min_size`` values or holds NaN
    (a set without images, the ``foreground`` aggregator where the runtime gave
    no member foreground, a Δ of an undefined AUROC), or ``fn`` returns None
    (a rank correlation of constant scores). Everything else ``fn`` raises
    (a shape mismatch, a bad dtype) is a bug and propagates.
    """
    for x in inputs:
        a = np.asarray(x, dtype=np.float64)
        if a.size < min_size or not np.isfinite(a).all():
            return math.nan
    v = fn(*inputs)
    if v is None:
        return math.nan
    v = float(v)
    return v if np.isfinite(v) else math.nan
