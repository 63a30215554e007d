"""The predict pipeline: a volume in, segmentation + TU/AU/EU maps + report out.

Used by ``uqserve predict``, the sidecar and ``evaluate``. From Python::

    import uqserve.predict
    results = uqserve.predict(["scan.nii.gz"], "out")        # writes files
    pred = uqserve.predict.predict_volume(volume, "ssn-ensemble")  # in memory

(``uqserve.predict`` is this module and is also callable as ``predict``.)

Steps for one volume ``[X, Y, Z]``:

1. non-finite voxels are replaced by the minimum finite value (a warning in
   the report); an all-NaN volume is refused;
2. the volume is cut into 2D slices along its through-plane axis
   (``Volume.slice_axis``: the last array axis unless the spacing says
   otherwise, see ``uqserve.volumes.nifti.through_plane_axis``); slice ``z``
   is fed as ``image[:, :, z]``, rows = the first array axis;
3. intensities are normalised as ``manifest.input.normalization`` says;
4. each slice is padded at its far edges (bottom/right) by reflection to
   ``max(tile_size, ceil to multiple)``; ``offset = (z, 0, 0)`` and
   ``valid = (rows, cols)`` tell the graph which pixels are real;
5. batches of slices go through the runtime; each member's mean and
   sample entropy are cropped and streamed into an ``Accumulator`` slab by
   slab, so memory is O(K x voxels) whatever M and S (the slices per call are
   capped so that the graphs' ``[B, S, K, H, W]`` sample tensors stay under
   ``SAMPLE_BUDGET`` elements);
6. image-level scores, OOD decision, scan entanglement and the volume
   distribution (from per-sample class counts, ``M x S`` coherent samples)
   complete the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve import __version__, uncertainty
from uqserve.bundle import Bundle, Manifest
from uqserve.runtime import Batch, Runtime, RuntimeError_, open_runtime
from uqserve.volumes import (
    OutputError,
    Volume,
    VolumeError,
    atomic_output_dir,
    read_volume,
    sanitize,
    scan_name,
    write_nifti_like,
)
from uqserve.volumes.nifti import is_nifti_path

__all__ = [
    "PredictError",
    "Prediction",
    "ScanResult",
    "collect_scans",
    "predict",
    "predict_volume",
    "write_outputs",
]

DEFAULT_OUT_DIR = Path("uqserve-out")
OUTPUT_FILES = ("seg.nii.gz", "prob.nii.gz", "tu.nii.gz", "au.nii.gz", "eu.nii.gz", "report.json")

# Elements of one [B, S, K, H, W] sample tensor per call (32 MiB of float32).
SAMPLE_BUDGET = 1 << 23

ProgressFn = Callable[[str, int, int], None]
"""``progress(scan_name, slices_done, slices_total)``, called after every batch."""


class PredictError(ValueError):
    """Inputs to predict that cannot be used (options, shapes, runtime outputs)."""


@dataclass
class Prediction:
    """Everything predicted for one volume, in the volume's array order ``[X, Y, Z]``.

    seg            ``[X, Y, Z]`` uint8, argmax of the mean prediction
    prob           ``[K, X, Y, Z]`` float32, mean prediction p̄
    tu, au, eu     ``[X, Y, Z]`` float32, nats
    au_sample, au_latent  ``[X, Y, Z]`` float32, AU = AU_sample + AU_latent
    sample_counts  ``[M, S, K]`` float64, voxels per class in each coherent sample
    sample_labels  ``[M, S, X, Y, Z]`` uint8 with ``want_samples``, else None
    report         the report.json content minus file facts (sha256, outputs)
    """

    seg: npt.NDArray[np.uint8]
    prob: npt.NDArray[np.float32]
    tu: npt.NDArray[np.float32]
    au: npt.NDArray[np.float32]
    eu: npt.NDArray[np.float32]
    au_sample: npt.NDArray[np.float32]
    au_latent: npt.NDArray[np.float32]
    sample_counts: npt.NDArray[np.float64]
    sample_labels: npt.NDArray[np.uint8] | None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    """Outcome of one scan in ``predict``: ``out_dir`` and ``report``, or ``error``."""

    source: Path
    name: str
    out_dir: Path | None = None
    report: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def predict_volume(
    volume: Volume,
    bundle: Bundle | str | os.PathLike[str] | None = None,
    *,
    runtime: Runtime | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    want_samples: bool = False,
    progress: ProgressFn | None = None,
) -> Prediction:
    """Segment ``volume`` and decompose its uncertainty.

    ``bundle``: a ``Bundle``, a shipped name or a folder (default bundle when
    ``None``); ignored when ``runtime`` is given (its bundle is used).
    ``seed``: the noise seed (default: the bundle's seed). ``batch_size``:
    slices per runtime call (default: the runtime's preferred size, 1 on a CPU,
    8 on a GPU or Triton); results are bit-identical for any value.
    Raises ``VolumeError`` for unusable volumes, ``BundleError`` for bad
    bundles, ``PredictError`` for bad options.
    """
    t_start = time.perf_counter()
    _check_batch_size(batch_size)
    own_runtime = runtime is None
    if runtime is None:
        runtime = open_runtime(bundle, device="auto")
    try:
        return _predict(
            volume, runtime, seed=seed, batch_size=batch_size or runtime.preferred_batch_size,
            want_samples=want_samples, progress=progress, t_start=t_start,
        )  # fmt: skip
    finally:
        if own_runtime:
            runtime.close()


def _slices_last(dec: uncertainty.Decomposition) -> uncertainty.Decomposition:
    """Maps ``[..., Z, X, Y]`` (the accumulator's order) -> ``[..., X, Y, Z]``, contiguous."""

    def last(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.ascontiguousarray(np.moveaxis(a, -3, -1))

    fg = dec.member_foreground
    return dataclasses.replace(
        dec,
        mean=last(dec.mean),
        tu=last(dec.tu),
        au=last(dec.au),
        eu=last(dec.eu),
        au_sample=last(dec.au_sample),
        au_latent=last(dec.au_latent),
        member_foreground=None if fg is None else last(fg),
    )


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise PredictError(
            f"batch_size must be an integer >= 1 or None (the runtime's choice), got {batch_size}"
        )


def _predict(
    volume: Volume,
    runtime: Runtime,
    *,
    seed: int | None,
    batch_size: int,
    want_samples: bool,
    progress: ProgressFn | None,
    t_start: float,
) -> Prediction:
    bundle = runtime.bundle
    man = bundle.manifest
    if seed is None:
        seed = man.seed
    if not 0 <= int(seed) < 2**63:
        raise PredictError(f"seed must be in 0..2^63-1, got {seed}")
    seed = int(seed)
    if man.input.channels != 1:
        raise PredictError(
            f"bundle {man.name} expects {man.input.channels} channels; "
            "uqserve predict reads single-channel scans"
        )
    if volume.data.ndim != 3:
        raise VolumeError(
            f"{volume.source}: volume data must be [X, Y, Z], got {volume.data.shape}"
        )
    volume, n_bad = sanitize(volume)
    warnings: list[str] = []
    if n_bad:
        warnings.append(f"{n_bad} non-finite voxels (NaN/Inf) replaced by the minimum finite value")
    axis = int(volume.slice_axis)
    # Working order: through-plane axis last. A view, no copy.
    work = np.moveaxis(volume.data, axis, -1)
    rows, cols, depth = (int(s) for s in work.shape)
    K, M, S = man.num_classes, man.num_members, man.num_samples

    t0 = time.perf_counter()
    shift, scale, clip = _normalization(work, man, warnings, volume.source)
    t_norm = time.perf_counter() - t0

    tile_h, tile_w = man.input.tile_size
    mult = max(1, man.input.multiple)
    pad_h = max(tile_h, math.ceil(rows / mult) * mult)
    pad_w = max(tile_w, math.ceil(cols / mult) * mult)

    # The member graphs hold [B, S, K, H, W] sample tensors: cap B so that their size,
    # and with it peak memory, does not grow with S (results do not depend on B).
    batch_size = min(batch_size, max(1, SAMPLE_BUDGET // (S * K * pad_h * pad_w)))

    def batches() -> Iterator[Batch]:
        for z0 in range(0, depth, batch_size):
            z1 = min(depth, z0 + batch_size)
            b = z1 - z0
            sl = np.transpose(work[:, :, z0:z1], (2, 0, 1)).astype(np.float32)  # [b, X, Y]
            if clip is not None:
                np.clip(sl, clip[0], clip[1], out=sl)
            sl -= shift
            sl *= scale
            sl = np.pad(sl, ((0, 0), (0, pad_h - rows), (0, pad_w - cols)), mode="reflect")
            yield Batch(
                image=sl[:, np.newaxis],
                seed=np.full(b, seed, np.int64),
                offset=np.stack(
                    [np.arange(z0, z1), np.zeros(b, np.int64), np.zeros(b, np.int64)], axis=1
                ).astype(np.int64),
                valid=np.tile(np.array([[rows, cols]], np.int64), (b, 1)),
            )

    # Slices first: each batch is then one contiguous slab of the running sums (a
    # [X, Y, Z] domain made every add a strided write, 1.5 s of a 256^2 x 64 scan).
    acc = uncertainty.Accumulator(K, (depth, rows, cols))
    counts = np.zeros((M, S, K), np.float64)
    labels = np.zeros((M, S, rows, cols, depth), np.uint8) if want_samples else None
    t_model = 0.0
    t_acc = 0.0
    z0 = 0
    results = runtime.infer_many(batches(), want_samples=want_samples)
    while True:
        t0 = time.perf_counter()
        try:
            outs = next(results)
        except StopIteration:
            break
        t_model += time.perf_counter() - t0
        t0 = time.perf_counter()
        b = min(batch_size, depth - z0)
        where = (slice(z0, z0 + b),)
        if len(outs) != M:
            raise RuntimeError_(f"runtime returned {len(outs)} members, bundle {man.name} has {M}")
        for m, out in enumerate(outs):
            _check_outputs(
                out.mean, out.sample_entropy, out.sample_counts, (b, K, pad_h, pad_w), S, m
            )
            mean = np.swapaxes(out.mean[:, :, :rows, :cols], 0, 1)  # [K, b, X, Y]
            # S = 1: the sample entropy is H[p̄_m]; let the accumulator compute it so
            # that AU_latent is exactly 0 rather than float noise.
            ent = None if S == 1 else out.sample_entropy[:, :rows, :cols]  # [b, X, Y]
            acc.add(mean, ent, where=where)
            counts[m] += out.sample_counts.sum(axis=0, dtype=np.float64)
            if labels is not None:
                if out.sample_labels is None:
                    raise RuntimeError_(f"runtime returned no sample_labels for member {m}")
                labels[m, :, :, :, z0 : z0 + b] = np.transpose(
                    out.sample_labels[:, :, :rows, :cols], (1, 2, 3, 0)
                )
        t_acc += time.perf_counter() - t0
        z0 += b
        if progress is not None:
            progress(volume.source, z0, depth)
    if z0 != depth:
        raise RuntimeError_(f"runtime returned {z0} of {depth} slices")

    t0 = time.perf_counter()
    dec = _slices_last(acc.result(release=True))
    seg = np.argmax(dec.mean, axis=0).astype(np.uint8)
    agg = man.default_aggregator
    thresholds = man.validation.get("thresholds", {}) if isinstance(man.validation, dict) else {}

    def score(u: npt.NDArray[np.float32], aggregator: str, key: str) -> float | None:
        thr = thresholds.get(key) if isinstance(thresholds, dict) else None
        if aggregator == "threshold" and thr is None:
            return None  # the bundle was calibrated without a cut-off for this map
        return float(
            uncertainty.image_score(
                u,
                aggregator,
                seg=seg,
                member_foreground=dec.member_foreground,
                threshold=None if thr is None else float(thr),
            )
        )

    scores: dict[str, Any] = {
        "aggregator": agg,
        "tu": score(dec.tu, agg, "tu"),
        "au": score(dec.au, agg, "au"),
        "eu": score(dec.eu, agg, "eu"),
        "au_sample": score(dec.au_sample, agg, "au_sample"),
        "au_latent": score(dec.au_latent, agg, "au_latent"),
    }
    ood_score = score(dec.eu, man.ood.aggregator, "eu") if M > 1 else 0.0
    if ood_score is None:
        raise PredictError(
            f"{bundle.path}: OOD aggregator 'threshold' has no EU cut-off in the manifest; "
            "run `uqserve calibrate` on the bundle"
        )
    ood = _ood(man, ood_score)
    if M == 1:
        warnings.append("bundle has no epistemic method (one member): EU is 0, no OOD flag")
    ent_scan = uncertainty.scan_entanglement(dec.tu, dec.au, dec.eu, K)
    vols = uncertainty.volume_distribution(
        counts.reshape(M * S, K), volume.voxel_volume_ml, list(man.classes)
    )
    t_scores = time.perf_counter() - t0

    def back(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.moveaxis(a, -1, axis) if axis != 2 else a

    shape = volume.shape
    report: dict[str, Any] = {
        "scan": {
            "name": volume.source,
            "shape": list(shape),
            "spacing": [round(s, 6) for s in volume.spacing],
            "slice_axis": axis,
            **(
                {"volume_index": volume.meta["volume_index"]}
                if volume.meta.get("volume_index") is not None
                else {}
            ),
            "nonfinite_voxels": n_bad,
        },
        "bundle": {
            "name": man.name,
            "au": man.au,
            "eu": man.eu,
            "members": M,
            "samples": S,
            "classes": list(man.classes),
            "manifest_sha256": bundle.manifest_sha256,
        },
        "seed": seed,
        "runtime": {"name": runtime.name, "device": runtime.device},
        "scores": scores,
        "ood": ood,
        "entanglement": {
            "scan": None if ent_scan is None else float(ent_scan),
            "bundle": dict(man.entanglement) or None,
        },
        "volumes": _jsonable(vols),
        "timings": {
            "normalize_s": t_norm,
            "model_s": t_model,
            "accumulate_s": t_acc,
            "scores_s": t_scores,
            "predict_s": time.perf_counter() - t_start,
        },
        "warnings": warnings,
        "uqserve_version": __version__,
    }
    return Prediction(
        seg=back(seg),
        prob=np.moveaxis(dec.mean, -1, axis + 1) if axis != 2 else dec.mean,
        tu=back(dec.tu),
        au=back(dec.au),
        eu=back(dec.eu),
        au_sample=back(dec.au_sample),
        au_latent=back(dec.au_latent),
        sample_counts=counts,
        sample_labels=None
        if labels is None
        else (np.moveaxis(labels, -1, axis + 2) if axis != 2 else labels),
        report=report,
    )


def _normalization(
    work: npt.NDArray[np.float32], man: Manifest, warnings: list[str], source: str
) -> tuple[np.float32, np.float32, tuple[float, float] | None]:
    """``(shift, scale, clip)`` so that the graph input is ``(clip(x) - shift) * scale``."""
    norm = man.input.normalization
    clip = tuple(norm.clip) if norm.clip is not None else None
    shift, scale = norm.shift_scale(None if norm.scheme == "fixed" else work)
    if norm.scheme == "zscore" and scale == 1.0 and float(np.ptp(work)) == 0.0:
        warnings.append(f"{source}: constant intensity; z-score normalisation used std 1")
    return np.float32(shift), np.float32(scale), clip  # type: ignore[return-value]


def _check_outputs(
    mean: npt.NDArray[Any],
    ent: npt.NDArray[Any],
    cnt: npt.NDArray[Any],
    expected: tuple[int, int, int, int],
    S: int,
    m: int,
) -> None:
    b, K, h, w = expected
    if mean.shape != expected or ent.shape != (b, h, w) or cnt.shape != (b, S, K):
        raise RuntimeError_(
            f"member {m} returned mean {mean.shape}, sample_entropy {ent.shape}, "
            f"sample_counts {cnt.shape}; expected {expected}, {(b, h, w)}, {(b, S, K)}: "
            "the graph does not match its manifest; re-export the bundle"
        )


def _ood(man: Manifest, score: float) -> dict[str, Any]:
    spec = man.ood
    threshold = spec.threshold
    if threshold is None and spec.validation_scores:
        threshold = uncertainty.calibrate_ood_threshold(
            np.asarray(spec.validation_scores), spec.quantile
        )
    if man.num_members == 1:
        threshold = None  # no epistemic method: EU is 0 by construction
    res = uncertainty.ood_decision(score, threshold, np.asarray(spec.validation_scores))
    d = dict(_jsonable(res.to_dict()))
    d["aggregator"] = spec.aggregator
    return d


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


# --------------------------------------------------------------------------------------
# Files


def collect_scans(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand the inputs into scans.

    A file is one scan. A folder holding ``.nii``/``.nii.gz`` files gives those
    files (sorted, not recursive); any other folder is one DICOM series. Paths
    that do not exist are kept so that they are reported as failures.
    """
    scans: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            niftis = sorted(c for c in p.iterdir() if c.is_file() and is_nifti_path(c))
            scans.extend(niftis if niftis else [p])
        else:
            scans.append(p)
    return scans


def input_sha256(path: Path) -> str:
    """sha256 of a file; for a folder, of its files' relative names and bytes in sorted order."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        if f is not path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_outputs(
    pred: Prediction, volume: Volume, folder: Path, *, png: bool = False
) -> dict[str, Any]:
    """Write seg/prob/tu/au/eu NIfTI files (and ``preview.png``) into ``folder``.

    Returns the ``outputs`` entry of the report (file names). ``report.json``
    is written by the caller, last.
    """
    K = pred.prob.shape[0]
    write_nifti_like(pred.seg, volume, folder / "seg.nii.gz")
    prob = pred.prob[1] if K == 2 else np.moveaxis(pred.prob, 0, -1)
    write_nifti_like(np.ascontiguousarray(prob, dtype=np.float32), volume, folder / "prob.nii.gz")
    for key in ("tu", "au", "eu"):
        write_nifti_like(getattr(pred, key).astype(np.float32), volume, folder / f"{key}.nii.gz")
    files = list(OUTPUT_FILES)
    if png:
        from uqserve.report import render_preview

        render_preview(
            volume, pred.seg, pred.tu, pred.au, pred.eu, folder / "preview.png",
            max_u=float(np.log(K)),
        )  # fmt: skip
        files.append("preview.png")
    return {"folder": str(folder), "files": files}


def predict(
    scans: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
    bundle: Bundle | str | os.PathLike[str] | None = None,
    *,
    seed: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    servers: Sequence[str] | None = None,
    runtime: Runtime | None = None,
    png: bool = False,
    overwrite: bool = False,
    volume_index: int | None = None,
    on_error: str = "raise",
    progress: ProgressFn | None = None,
    on_scan: Callable[[ScanResult], None] | None = None,
) -> list[ScanResult]:
    """Predict each scan and write ``out_dir/<scan name>/`` atomically.

    ``scans``: files (``.nii``, ``.nii.gz``), folders of NIfTI files, or DICOM
    series folders (see ``collect_scans``). Each result folder holds
    ``seg.nii.gz``, ``prob.nii.gz``, ``tu.nii.gz``, ``au.nii.gz``,
    ``eu.nii.gz``, ``report.json`` (and ``preview.png`` with ``png``); it
    appears only once complete and never replaces existing results unless
    ``overwrite``. ``on_error="raise"`` raises the first per-scan error
    (``VolumeError``, ``OutputError``, ...); ``"skip"`` records it in the
    ``ScanResult`` and goes on. Bundle and runtime errors always raise.
    """
    if on_error not in ("raise", "skip"):
        raise PredictError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    _check_batch_size(batch_size)
    if isinstance(scans, (str, os.PathLike)):
        scans = [scans]
    paths = collect_scans(scans)
    if not paths:
        raise PredictError("no scans given")
    out = Path(out_dir)
    own_runtime = runtime is None
    if runtime is None:
        runtime = open_runtime(bundle, servers=servers, device=device)
    results: list[ScanResult] = []
    seen: dict[str, Path] = {}
    try:
        for path in paths:
            name = scan_name(path)
            res = ScanResult(source=path, name=name)
            try:
                if name in seen:
                    raise OutputError(
                        f"{path}: same output name {name!r} as {seen[name]}; rename one of them "
                        "or predict them into different -o folders"
                    )
                seen[name] = path
                res.out_dir, res.report = _predict_file(
                    path, out / name, runtime, seed=seed, batch_size=batch_size, png=png,
                    overwrite=overwrite, volume_index=volume_index, progress=progress,
                )  # fmt: skip
            except (VolumeError, OutputError, PredictError) as exc:
                if on_error == "raise":
                    raise
                res.error = str(exc)
            except OSError as exc:  # disk full, permissions while writing
                if on_error == "raise":
                    raise OutputError(f"{out / name}: cannot write results ({exc})") from exc
                res.error = f"{out / name}: cannot write results ({exc.strerror or exc})"
            results.append(res)
            if on_scan is not None:
                on_scan(res)
    finally:
        if own_runtime:
            runtime.close()
    return results


def _predict_file(
    path: Path,
    final: Path,
    runtime: Runtime,
    *,
    seed: int | None,
    batch_size: int | None,
    png: bool,
    overwrite: bool,
    volume_index: int | None,
    progress: ProgressFn | None,
) -> tuple[Path, dict[str, Any]]:
    t0 = time.perf_counter()
    with atomic_output_dir(final, overwrite=overwrite) as tmp:
        volume = read_volume(path, volume_index=volume_index)
        t_read = time.perf_counter() - t0
        pred = predict_volume(
            volume, runtime=runtime, seed=seed, batch_size=batch_size, progress=progress
        )
        t1 = time.perf_counter()
        report = pred.report
        report["scan"]["name"] = path.name
        report["scan"]["sha256"] = input_sha256(path)
        report["outputs"] = write_outputs(pred, volume, tmp, png=png)
        report["outputs"]["folder"] = str(final)
        report["timings"]["read_s"] = t_read
        report["timings"]["write_s"] = time.perf_counter() - t1
        report["timings"]["total_s"] = time.perf_counter() - t0
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return final, report


class _CallableModule(types.ModuleType):
    """Lets ``uqserve.predict(...)`` call ``predict`` although it names this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> list[ScanResult]:
        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
