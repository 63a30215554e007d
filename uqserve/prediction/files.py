"""Files in, files out: the scan loop of ``uqserve.predict`` and the output writer.

Each scan is read, predicted with ``predict_volume`` and written into
``out_dir/<scan name>/`` through ``atomic_output_dir``: the folder appears
only once complete, so a failure leaves nothing half-written and never
touches earlier results.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uqserve.bundle import Bundle, BundleError
from uqserve.prediction.accumulate import ProgressFn
from uqserve.prediction.options import (
    PredictError,
    check_batch_size,
    check_on_error,
    check_overlap,
    resolve_seed,
)
from uqserve.prediction.pipeline import Prediction, predict_volume
from uqserve.prediction.report import Outputs, Report, report_json
from uqserve.prediction.windows import DEFAULT_OVERLAP
from uqserve.runtime import Runtime, RuntimeServiceError, open_runtime
from uqserve.volumes import (
    OutputError,
    Volume,
    VolumeError,
    atomic_output_dir,
    read_volume,
    scan_name,
    write_niftis_like,
)
from uqserve.volumes.base import voxel_limit
from uqserve.volumes.nifti import (
    DEFAULT_COMPRESSION_LEVEL,
    check_compression_level,
    is_nifti_path,
)

__all__ = [
    "DEFAULT_OUT_DIR",
    "OUTPUT_FILES",
    "ScanResult",
    "collect_scans",
    "input_sha256",
    "predict",
    "write_outputs",
]

log = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path("uqserve-out")
OUTPUT_FILES = ("seg.nii.gz", "prob.nii.gz", "tu.nii.gz", "au.nii.gz", "eu.nii.gz", "report.json")


@dataclass
class ScanResult:
    """Outcome of one scan in ``predict``: ``out_dir`` and ``report``, or ``error``."""

    source: Path
    name: str
    out_dir: Path | None = None
    report: Report | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


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
    pred: Prediction,
    volume: Volume,
    folder: Path,
    *,
    png: bool = False,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
) -> Outputs:
    """Write seg/prob/tu/au/eu NIfTI files (and ``preview.png``) into ``folder``.

    ``prob`` holds the foreground probability ``[X, Y, Z]`` for two classes,
    else all of them ``[X, Y, Z, K]``. The five files are gzipped at
    ``compression_level`` (0-9) in parallel threads. Returns the ``outputs``
    entry of the report (file names). ``report.json`` is written by the
    caller, last.
    """
    K = pred.prob.shape[0]
    prob = pred.prob[1] if K == 2 else np.moveaxis(pred.prob, 0, -1)
    maps = [
        (pred.seg, folder / "seg.nii.gz"),
        (np.ascontiguousarray(prob, dtype=np.float32), folder / "prob.nii.gz"),
        *(
            (getattr(pred, k).astype(np.float32), folder / f"{k}.nii.gz")
            for k in ("tu", "au", "eu")
        ),
    ]
    write_niftis_like(maps, volume, compression_level=compression_level)
    files = list(OUTPUT_FILES)
    if png:
        from uqserve.prediction.preview import render_preview

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
    overlap: float = DEFAULT_OVERLAP,
    device: str = "auto",
    precision: str = "fp32",
    servers: Sequence[str] | None = None,
    runtime: Runtime | None = None,
    png: bool = False,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    overwrite: bool = False,
    volume_index: int | None = None,
    max_voxels: int | None = None,
    timeout_s: float | None = None,
    deadline_s: float | None = None,
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
    ``progress(scan, slices_done, slices_total)`` is called after every
    batch, ``on_scan(result)`` after every scan. ``precision`` (``fp32``,
    ``tf32``, ``fp16``) applies to an embedded runtime opened here on a GPU;
    ``compression_level`` (0-9) to the gzipped maps. ``max_voxels`` refuses
    larger scans before reading them (see ``read_volume``). ``timeout_s`` (per
    request) and ``deadline_s`` (per scan) bound the wait for ``servers``.
    ``overlap``: the share of sliding windows (bundles with ``input.patch``).
    A scan that fails for any reason does not stop the others with ``"skip"``.
    """
    check_on_error(on_error)
    check_batch_size(batch_size)
    check_overlap(overlap)
    check_compression_level(compression_level)
    if max_voxels is not None:
        voxel_limit(max_voxels)  # a bad limit is an option error, not a per-scan one
    if isinstance(scans, (str, os.PathLike)):
        scans = [scans]
    paths = collect_scans(scans)
    if not paths:
        raise PredictError("no scans given")
    out = Path(out_dir)
    own_runtime = runtime is None
    if runtime is None:
        runtime = open_runtime(
            bundle, servers=servers, device=device, precision=precision,
            timeout_s=timeout_s, deadline_s=deadline_s,
        )  # fmt: skip
    elif timeout_s is not None or deadline_s is not None:
        raise PredictError(
            "timeout_s and deadline_s apply when predict opens the runtime; "
            "pass them to the runtime you give instead"
        )
    results: list[ScanResult] = []
    seen: dict[str, Path] = {}
    try:
        seed = resolve_seed(seed, runtime.bundle.manifest)  # before any file is read
        options: dict[str, Any] = dict(
            seed=seed, batch_size=batch_size, overlap=overlap, png=png, overwrite=overwrite,
            volume_index=volume_index, max_voxels=max_voxels, progress=progress,
            compression_level=compression_level,
        )  # fmt: skip
        for path in paths:
            res = _one_scan(path, out, runtime, seen, on_error, options)
            results.append(res)
            if on_scan is not None:
                on_scan(res)
    finally:
        if own_runtime:
            runtime.close()
    return results


def _one_scan(
    path: Path,
    out: Path,
    runtime: Runtime,
    seen: dict[str, Path],
    on_error: str,
    options: dict[str, Any],
) -> ScanResult:
    """Predict one scan into ``out/<scan name>``; with ``on_error="skip"`` failures are
    recorded in the result, except a runtime or bundle failure, which stops the loop."""
    name = scan_name(path)
    res = ScanResult(source=path, name=name)
    try:
        if name in seen:
            raise OutputError(
                f"{path}: same output name {name!r} as {seen[name]}; rename one of them "
                "or predict them into different `out_dir` folders"
            )
        seen[name] = path
        res.out_dir, res.report = _predict_file(path, out / name, runtime, **options)
    except (VolumeError, OutputError, PredictError) as exc:
        if on_error == "raise":
            raise
        res.error = str(exc)
    except OSError as exc:  # disk full, permissions while writing
        if on_error == "raise":
            raise OutputError(f"{out / name}: cannot write results ({exc})") from exc
        res.error = f"{out / name}: cannot write results ({exc.strerror or exc})"
    except MemoryError:
        if on_error == "raise":
            raise
        res.error = f"{path}: not enough memory for this scan; free memory or lower max_voxels"
    except (RuntimeServiceError, BundleError):
        raise  # the runtime or bundle is unusable: every further scan would fail too
    except Exception as exc:
        if on_error == "raise":
            raise
        # A bug, but one scan's bug must not cost the others their results.
        log.debug("predict failed on %s", path, exc_info=True)
        res.error = (
            f"{path}: internal error ({type(exc).__name__}: {exc}); please report it with this scan"
        )
    return res


def _predict_file(
    path: Path,
    final: Path,
    runtime: Runtime,
    *,
    seed: int | None,
    batch_size: int | None,
    overlap: float,
    png: bool,
    overwrite: bool,
    volume_index: int | None,
    max_voxels: int | None,
    progress: ProgressFn | None,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
) -> tuple[Path, Report]:
    """One scan: read, predict, write the maps, then ``report.json`` last."""
    t0 = time.perf_counter()
    with atomic_output_dir(final, overwrite=overwrite, inputs=[path]) as tmp:
        volume = read_volume(path, volume_index=volume_index, max_voxels=max_voxels)
        t_read = time.perf_counter() - t0
        pred = predict_volume(
            volume, runtime=runtime, seed=seed, batch_size=batch_size, overlap=overlap,
            progress=progress,
        )  # fmt: skip
        t1 = time.perf_counter()
        report = pred.report
        report["scan"]["name"] = path.name
        report["scan"]["sha256"] = input_sha256(path)
        report["outputs"] = write_outputs(
            pred, volume, tmp, png=png, compression_level=compression_level
        )
        report["outputs"]["folder"] = str(final)
        report["timings"]["read_s"] = t_read
        report["timings"]["write_s"] = time.perf_counter() - t1
        report["timings"]["total_s"] = time.perf_counter() - t0
        (tmp / "report.json").write_text(report_json(report))
    return final, report
