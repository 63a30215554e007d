"""``Predictor``: one bundle opened once, then any number of scans predicted with it.

Like nnU-Net's ``nnUNetPredictor``: the runtime (the onnxruntime sessions, or
the connection to Triton servers) is opened once and reused for every scan,
so a service pays for loading the graphs (and a GPU's autotuning) only once::

    import uqserve

    with uqserve.Predictor("ssn-ensemble", uqserve.RuntimeOptions(device="cpu")) as p:
        pred = p.predict("scan.nii.gz")              # a Prediction, nothing written
        results = p.predict_files(["a.nii.gz", "b.nii.gz"], "out")   # files in, files out

The sidecar, ``uqserve predict``, ``evaluate`` and ``calibrate`` all predict
through one. :func:`predict` is the one-call convenience: it opens a
``Predictor``, writes the files and closes it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from uqserve.bundle import Bundle, load_bundle
from uqserve.errors import UsageError
from uqserve.prediction.accumulate import ProgressFn
from uqserve.prediction.files import DEFAULT_OUT_DIR, ScanResult, check_scans, predict_scans
from uqserve.prediction.options import PredictError, check_batch_size, check_overlap
from uqserve.prediction.pipeline import Prediction, predict_volume
from uqserve.prediction.windows import DEFAULT_OVERLAP
from uqserve.runtime import Runtime, open_runtime
from uqserve.volumes import Volume, read_volume
from uqserve.volumes.nifti import DEFAULT_COMPRESSION_LEVEL

__all__ = ["Predictor", "RuntimeOptions", "predict"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a :class:`Predictor` runs the member graphs.

    ``device``: ``auto`` (a GPU when onnxruntime finds one), ``cpu`` or
    ``cuda``, for the in-process runtime. ``precision``: ``fp32`` (exact, the
    default), ``tf32`` or ``fp16`` on a GPU (the maps change by up to about
    1e-3). ``servers``: Triton gRPC URLs (``host:port``); given, the graphs run
    there instead, ``timeout_s`` per request (default 60 s) and ``deadline_s``
    per scan (retries included; default none). ``reduce``: ``graph`` sums
    the members' outputs in the reduction graph where they ran (the GPU),
    ``host`` in this process; ``auto`` (default): graph on CUDA.
    """

    device: str = "auto"
    precision: str = "fp32"
    servers: tuple[str, ...] = ()
    timeout_s: float | None = None
    deadline_s: float | None = None
    reduce: str = "auto"

    def __post_init__(self) -> None:
        # device and precision are checked by the runtime that uses them.
        if isinstance(self.servers, str):
            raise UsageError(f"`servers={self.servers}`: give a list of URLs, not one string")
        object.__setattr__(self, "servers", tuple(self.servers))

    def open(self, bundle: Bundle) -> Runtime:
        """The runtime these options describe, for ``bundle``."""
        return open_runtime(
            bundle, servers=list(self.servers) or None, device=self.device,
            precision=self.precision, timeout_s=self.timeout_s, deadline_s=self.deadline_s,
            reduce=self.reduce,
        )  # fmt: skip


class Predictor:
    """A bundle opened once for many predictions; a context manager.

    ``bundle``: a ``Bundle``, a shipped bundle's name or a bundle folder
    (``None``: the default bundle). ``options``: where the graphs run
    (:class:`RuntimeOptions`). ``seed`` (default: the bundle's), ``batch_size``
    (default: the runtime's preferred size) and ``overlap`` (of sliding
    windows, bundles with ``input.patch``) apply to every scan; the maps are
    bit-identical for any batch size. ``runtime``: an open runtime to use
    instead (its bundle is used; the caller keeps it and closes it).
    ``exact_scores``: rank every voxel for the scan's entanglement (default:
    a seeded sample of ``uncertainty.SCORE_SAMPLE`` voxels when more qualify).

    The runtime opens on first use (or :meth:`open`, e.g. to fail early on a
    server that is down). After a failure that is not the scan's fault (not a
    ``ValueError``) a runtime the predictor opened is closed and reopened by
    the next prediction, so a restarted server or GPU is picked up again.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str] | None = None,
        options: RuntimeOptions | None = None,
        *,
        seed: int | None = None,
        batch_size: int | None = None,
        overlap: float = DEFAULT_OVERLAP,
        runtime: Runtime | None = None,
        exact_scores: bool = False,
    ) -> None:
        check_batch_size(batch_size)
        check_overlap(overlap)
        if runtime is not None and options is not None:
            raise PredictError("give `options` or an open `runtime`, not both")
        self.options = options or RuntimeOptions()
        self.bundle = runtime.bundle if runtime is not None else _loaded(bundle)
        self.seed, self.batch_size, self.overlap = seed, batch_size, overlap
        self.exact_scores = exact_scores
        self._runtime = runtime
        self._owned = runtime is None

    # ------------------------------------------------------------------ the runtime
    @property
    def runtime(self) -> Runtime:
        """The open runtime (opened now if it is not)."""
        return self.open()

    def open(self) -> Runtime:
        """Open the runtime now (idempotent); a missing GPU or a server that is down or
        serves another bundle fails here."""
        if self._runtime is None:
            self._runtime = self.options.open(self.bundle)
        return self._runtime

    @property
    def is_open(self) -> bool:
        return self._runtime is not None

    def close(self) -> None:
        """Close a runtime this predictor opened (a given one stays open)."""
        if self._owned and self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            runtime.close()

    def __enter__(self) -> Predictor:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ predicting
    def predict(
        self,
        scan: Volume | str | os.PathLike[str],
        *,
        seed: int | None = None,
        want_samples: bool = False,
        volume_index: int | None = None,
        max_voxels: int | None = None,
        progress: ProgressFn | None = None,
    ) -> Prediction:
        """Segment one scan (a ``Volume``, or a NIfTI file or DICOM series folder to
        read) and decompose its uncertainty; nothing is written.

        ``seed``: this scan's noise seed (default: the predictor's).
        ``want_samples``: keep each sample's labels (``Prediction.sample_labels``).
        ``volume_index`` and ``max_voxels`` apply to reading (``read_volume``).
        """
        volume = (
            scan
            if isinstance(scan, Volume)
            else read_volume(scan, volume_index=volume_index, max_voxels=max_voxels)
        )
        run = functools.partial(
            predict_volume, volume, seed=self.seed if seed is None else seed,
            batch_size=self.batch_size,
            want_samples=want_samples, progress=progress, overlap=self.overlap,
            exact_scores=self.exact_scores,
        )  # fmt: skip
        return self._guarded(lambda runtime: run(runtime=runtime))

    def predict_files(
        self,
        scans: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
        *,
        png: bool = False,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        overwrite: bool = False,
        volume_index: int | None = None,
        max_voxels: int | None = None,
        on_error: str = "raise",
        progress: ProgressFn | None = None,
        on_scan: Callable[[ScanResult], None] | None = None,
        pipeline: bool = True,
    ) -> list[ScanResult]:
        """Predict each scan and write ``out_dir/<scan name>/`` atomically (see
        :func:`predict` for the files and the options)."""
        paths = check_scans(
            scans, on_error=on_error, batch_size=self.batch_size, overlap=self.overlap,
            compression_level=compression_level, max_voxels=max_voxels,
        )  # fmt: skip
        run = functools.partial(
            predict_scans, paths=paths, out_dir=out_dir, seed=self.seed,
            batch_size=self.batch_size, overlap=self.overlap, png=png,
            compression_level=compression_level, overwrite=overwrite, volume_index=volume_index,
            max_voxels=max_voxels, on_error=on_error, progress=progress, on_scan=on_scan,
            pipeline=pipeline, exact_scores=self.exact_scores,
        )  # fmt: skip
        return self._guarded(lambda runtime: run(runtime=runtime))

    def _guarded(self, run: Callable[[Runtime], _T]) -> _T:
        """``run(runtime)``; a failure other than the input's closes an owned runtime."""
        try:
            return run(self.open())
        except ValueError:
            raise  # a bad scan or option: keep the sessions for the next one
        except Exception:
            if self._owned:
                self.close()
            raise


def _loaded(bundle: Bundle | str | os.PathLike[str] | None) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


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
    pipeline: bool = True,
    exact_scores: bool = False,
) -> list[ScanResult]:
    """Predict each scan and write ``out_dir/<scan name>/`` atomically.

    A :class:`Predictor` opened for this one call (``device``, ``precision``,
    ``servers``, ``timeout_s``, ``deadline_s``: :class:`RuntimeOptions`), or on
    the open ``runtime`` given. ``scans``: files (``.nii``, ``.nii.gz``),
    folders of NIfTI files, or DICOM series folders (see ``collect_scans``).
    Each result folder holds ``seg.nii.gz``, ``prob.nii.gz``, ``tu.nii.gz``,
    ``au.nii.gz``, ``eu.nii.gz``, ``report.json`` (and ``preview.png`` with
    ``png``); it appears only once complete and never replaces existing
    results unless ``overwrite``. ``on_error="raise"`` raises the first
    per-scan error (``VolumeError``, ``OutputError``, ...); ``"skip"`` records
    it in the ``ScanResult`` and goes on. Bundle and runtime errors always
    raise. ``progress(scan, slices_done, slices_total)`` is called after every
    batch, ``on_scan(result)`` after every scan. ``compression_level`` (1-9)
    gzips the maps; 0 writes plain ``.nii`` maps instead. ``max_voxels``
    refuses larger scans before reading them (see ``read_volume``).
    ``exact_scores``: see :class:`Predictor`. ``overlap``: the share of sliding
    windows (bundles with ``input.patch``). ``pipeline``: write each scan's
    files in a background thread while the next scan is read and predicted
    (at most two scans in memory); results, ``on_scan`` calls and errors still
    come in scan order.
    """
    options = None
    if runtime is None:
        options = RuntimeOptions(
            device=device, precision=precision, servers=tuple(servers or ()),
            timeout_s=timeout_s, deadline_s=deadline_s,
        )  # fmt: skip
    elif timeout_s is not None or deadline_s is not None:
        raise PredictError(
            "timeout_s and deadline_s apply when predict opens the runtime; "
            "pass them to the runtime you give instead"
        )
    # Not `with`: the predictor opens its runtime once the options and scans are checked.
    predictor = Predictor(
        bundle if runtime is None else None, options, seed=seed, batch_size=batch_size,
        overlap=overlap, runtime=runtime, exact_scores=exact_scores,
    )  # fmt: skip
    try:
        return predictor.predict_files(
            scans, out_dir, png=png, compression_level=compression_level, overwrite=overwrite,
            volume_index=volume_index, max_voxels=max_voxels, on_error=on_error,
            progress=progress, on_scan=on_scan, pipeline=pipeline,
        )  # fmt: skip
    finally:
        predictor.close()
