"""Files in, files out: the scan loop of ``Predictor.predict_files`` and the output writer.

Each scan is read, predicted with ``predict_volume`` and written into
``out_dir/<scan name>/`` through ``atomic_output_dir``: the folder appears
only once complete, so a failure leaves nothing half-written and never
touches earlier results.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from uqserve.bundle import BundleError
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
from uqserve.runtime import Runtime, RuntimeServiceError
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
    "check_scans",
    "collect_scans",
    "input_sha256",
    "output_files",
    "predict_scans",
    "write_outputs",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_OUT_DIR = Path("uqserve-out")
OUTPUT_FILES = ("seg.nii.gz", "prob.nii.gz", "tu.nii.gz", "au.nii.gz", "eu.nii.gz", "report.json")
_MAPS = ("seg", "prob", "tu", "au", "eu")


def output_files(compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> tuple[str, ...]:
    """The files of a result folder: ``OUTPUT_FILES``, or plain ``.nii`` maps at level 0."""
    suffix = ".nii" if compression_level == 0 else ".nii.gz"
    return (*(f"{m}{suffix}" for m in _MAPS), "report.json")


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
    ``compression_level`` (1-9) in parallel threads; level 0 writes plain
    ``.nii`` files (no gzip pass at all). Returns the ``outputs``
    entry of the report (file names). ``report.json`` is written by the
    caller, last.
    """
    K = pred.prob.shape[0]
    prob = pred.prob[1] if K == 2 else np.moveaxis(pred.prob, 0, -1)
    files = list(output_files(compression_level))
    arrays = [
        pred.seg,
        np.ascontiguousarray(prob, dtype=np.float32),
        *(getattr(pred, k).astype(np.float32, copy=False) for k in ("tu", "au", "eu")),
    ]
    maps = [(a, folder / name) for a, name in zip(arrays, files, strict=False)]
    write_niftis_like(maps, volume, compression_level=compression_level)
    if png:
        from uqserve.prediction.preview import render_preview

        bundle = pred.report.get("bundle") or {}
        render_preview(
            volume, pred.seg, pred.tu, pred.au, pred.eu, folder / "preview.png",
            classes=list(bundle.get("classes") or []), ood=pred.report.get("ood"),
        )  # fmt: skip
        files.append("preview.png")
    return {"folder": str(folder), "files": files}


def check_scans(
    scans: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    on_error: str = "raise",
    batch_size: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    max_voxels: int | None = None,
) -> list[Path]:
    """The scan files to predict (``collect_scans``), once the options are checked.

    Everything here fails before a runtime is opened or a scan is read.
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
    return paths


def predict_scans(
    runtime: Runtime,
    paths: list[Path],
    out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
    *,
    seed: int | None = None,
    batch_size: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    png: bool = False,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    overwrite: bool = False,
    volume_index: int | None = None,
    max_voxels: int | None = None,
    on_error: str = "raise",
    progress: ProgressFn | None = None,
    on_scan: Callable[[ScanResult], None] | None = None,
    pipeline: bool = True,
    exact_scores: bool = False,
) -> list[ScanResult]:
    """Predict each of ``paths`` (from :func:`check_scans`) on ``runtime`` and write
    ``out_dir/<scan name>/`` atomically.

    The scan loop of :meth:`uqserve.Predictor.predict_files` and
    :func:`uqserve.predict` (whose docstring describes the options); the
    runtime stays open.
    """
    seed = resolve_seed(seed, runtime.bundle.manifest)  # before any file is read
    options: dict[str, Any] = dict(
        seed=seed, batch_size=batch_size, overlap=overlap, overwrite=overwrite,
        volume_index=volume_index, max_voxels=max_voxels, progress=progress,
        exact_scores=exact_scores,
    )  # fmt: skip
    writing = {"png": png, "compression_level": compression_level}
    results: list[ScanResult] = []

    def done(res: ScanResult) -> None:
        results.append(res)
        if on_scan is not None:
            on_scan(res)

    _scan_loop(paths, Path(out_dir), runtime, on_error, options, writing, done, pipeline=pipeline)
    return results


def _scan_loop(
    paths: list[Path],
    out: Path,
    runtime: Runtime,
    on_error: str,
    options: dict[str, Any],
    writing: dict[str, Any],
    done: Callable[[ScanResult], None],
    *,
    pipeline: bool,
) -> None:
    """Predict scan i + 1 while a writer thread writes scan i's files; commit and report
    them in order, in this thread.

    At most one write is pending, so at most two scans' maps are held. An
    error of a write surfaces (``on_error="raise"``) once the next scan is
    predicted; that scan's temporary folder is then removed, nothing is left.
    Folders are committed here, not in the writer, so a commit happens in the
    thread that handles signals, one scan after the other.
    """
    seen: dict[str, Path] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="uqserve-write") as writer:
        previous: Future[tuple[ScanResult, _Pending | None]] | None = None
        for path in paths:
            try:
                res, pending = _start_scan(path, out, runtime, seen, on_error, options)
            except BaseException:
                if previous is not None:  # the earlier scan reports (or fails) first
                    done(_commit_scan(*previous.result(), on_error))
                raise
            try:
                if previous is not None:
                    done(_commit_scan(*previous.result(), on_error))
                    previous = None
            except BaseException as exc:
                if pending is not None:
                    pending.abort(exc)
                raise
            if pending is None:
                done(res)
            elif pipeline:
                previous = writer.submit(_write_scan, res, pending, on_error, writing)
            else:
                done(_commit_scan(*_write_scan(res, pending, on_error, writing), on_error))
        if previous is not None:
            done(_commit_scan(*previous.result(), on_error))


@dataclass
class _Pending:
    """A scan predicted into the temporary folder of ``stack``, not yet committed."""

    path: Path
    final: Path
    stack: contextlib.ExitStack
    tmp: Path
    volume: Volume
    pred: Prediction
    t0: float
    t_read: float

    def abort(self, exc: BaseException) -> None:
        """Remove the temporary folder (the final folder is left as it was)."""
        self.stack.__exit__(type(exc), exc, exc.__traceback__)

    def commit(self) -> tuple[Path, Report]:
        """Rename the complete temporary folder into place (``OutputError`` if it cannot)."""
        self.stack.close()
        return self.final, self.pred.report


def _start_scan(
    path: Path,
    out: Path,
    runtime: Runtime,
    seen: dict[str, Path],
    on_error: str,
    options: dict[str, Any],
) -> tuple[ScanResult, _Pending | None]:
    """Read and predict one scan into a temporary folder; None with a recorded error."""
    name = scan_name(path)
    res = ScanResult(source=path, name=name)

    def start() -> _Pending:
        if name in seen:
            raise OutputError(
                f"{path}: same output name {name!r} as {seen[name]}; rename one of them "
                "or predict them into different `out_dir` folders"
            )
        seen[name] = path
        return _start_file(path, out / name, runtime, **options)

    return res, _guard(res, path, out / name, on_error, start)


def _write_scan(
    res: ScanResult, pending: _Pending, on_error: str, writing: dict[str, Any]
) -> tuple[ScanResult, _Pending | None]:
    """Write a predicted scan's files into its temporary folder (in the writer thread);
    the pending scan is None when that failed (recorded in ``res``)."""
    ok = _guard(
        res, pending.path, pending.final, on_error, lambda: _write_files(pending, **writing)
    )
    return res, pending if ok else None


def _commit_scan(res: ScanResult, pending: _Pending | None, on_error: str) -> ScanResult:
    """Commit a written scan's folder; nothing to do for a scan that failed."""
    if pending is not None:
        got = _guard(res, pending.path, pending.final, on_error, pending.commit)
        if got is not None:
            res.out_dir, res.report = got
    return res


def _guard(
    res: ScanResult, path: Path, final: Path, on_error: str, step: Callable[[], _T]
) -> _T | None:
    """Run one step of a scan; with ``on_error="skip"`` a failure is recorded in ``res``
    (None is returned), except a runtime or bundle failure, which stops the loop."""
    try:
        return step()
    except (VolumeError, OutputError, PredictError) as exc:
        if on_error == "raise":
            raise
        res.error = str(exc)
    except OSError as exc:  # disk full, permissions while writing
        if on_error == "raise":
            raise OutputError(f"{final}: cannot write results ({exc})") from exc
        res.error = f"{final}: cannot write results ({exc.strerror or exc})"
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
    return None


def _start_file(
    path: Path,
    final: Path,
    runtime: Runtime,
    *,
    seed: int | None,
    batch_size: int | None,
    overlap: float,
    overwrite: bool,
    volume_index: int | None,
    max_voxels: int | None,
    progress: ProgressFn | None,
    exact_scores: bool = False,
) -> _Pending:
    """One scan's first half: open its temporary folder, read, predict."""
    t0 = time.perf_counter()
    stack = contextlib.ExitStack()
    tmp = stack.enter_context(atomic_output_dir(final, overwrite=overwrite, inputs=[path]))
    try:
        volume = read_volume(path, volume_index=volume_index, max_voxels=max_voxels)
        t_read = time.perf_counter() - t0
        pred = predict_volume(
            volume, runtime=runtime, seed=seed, batch_size=batch_size, overlap=overlap,
            progress=progress, exact_scores=exact_scores,
        )  # fmt: skip
    except BaseException as exc:
        stack.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return _Pending(path, final, stack, tmp, volume, pred, t0, t_read)


def _write_files(
    pending: _Pending, *, png: bool, compression_level: int = DEFAULT_COMPRESSION_LEVEL
) -> bool:
    """The second half: the maps, then ``report.json`` last, into the temporary folder."""
    p = pending
    try:
        t1 = time.perf_counter()
        report = p.pred.report
        report["scan"]["name"] = p.path.name
        report["scan"]["sha256"] = input_sha256(p.path)
        report["outputs"] = write_outputs(
            p.pred, p.volume, p.tmp, png=png, compression_level=compression_level
        )
        report["outputs"]["folder"] = str(p.final)
        report["timings"]["read_s"] = p.t_read
        report["timings"]["write_s"] = time.perf_counter() - t1
        report["timings"]["total_s"] = time.perf_counter() - p.t0
        (p.tmp / "report.json").write_text(report_json(report))
    except BaseException as exc:
        p.abort(exc)
        raise
    return True
