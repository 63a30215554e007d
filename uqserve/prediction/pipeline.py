"""``predict_volume``: one volume in memory -> segmentation, TU/AU/EU maps, report.

The steps, each in its own module:

1. ``options``: the seed, the overlap and the bundle's channel count are checked;
2. ``intensity.clean``: non-finite voxels are replaced by the minimum finite
   value (a warning in the report); an all-NaN volume is refused;
3. ``crop``: with ``input.crop_nonzero``, the scan is cut to its nonzero box;
4. ``frame``: the bundle's orientation and spacing; a scan already in that
   frame, with no patch, goes on as stored (step 5a), any other through
   reorientation, resampling and sliding windows (step 5b);
5a. ``geometry.plan_slices`` -> ``intensity.normalization`` ->
   ``geometry.iter_batches`` -> ``Runtime.infer_many`` ->
   ``accumulate.accumulate``: whole slices through the member graphs, their
   outputs streamed into running sums, O(K x voxels) memory;
5b. ``windows`` -> ``stitch``: Gaussian-weighted windows on the model grid,
   member means (or, with ``input.blend`` ``logits``, log-probabilities) and
   sample entropies resampled back to the input grid, where TU/AU/EU are
   recomputed;
6. ``scoring``: segmentation, image-level scores, OOD decision, scan
   entanglement and the volume distribution;
7. ``report.build_report``: the typed report; ``geometry.to_volume_order``
   moves the maps back to the volume's axis order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from uqserve import uncertainty
from uqserve.bundle import Bundle
from uqserve.prediction.accumulate import ProgressFn, accumulate, member_preparer
from uqserve.prediction.crop import Crop, plan_crop
from uqserve.prediction.frame import Frame, FrameInfo, pin_slice_axis, plan_frame
from uqserve.prediction.geometry import iter_batches, plan_slices, to_volume_order
from uqserve.prediction.intensity import (
    bounded_warning,
    clean,
    normalization,
    normalize_volume,
)
from uqserve.prediction.options import (
    check_batch_size,
    check_channels,
    check_overlap,
    resolve_seed,
)
from uqserve.prediction.report import Report, Timings, build_report
from uqserve.prediction.scoring import score_prediction, segment
from uqserve.prediction.stitch import recount, stitch
from uqserve.prediction.windows import DEFAULT_OVERLAP, iter_tiles, plan_tiles
from uqserve.runtime import MemberOutputs, ReducedOutputs, Runtime, open_runtime
from uqserve.volumes import Volume

__all__ = ["Prediction", "predict_volume"]


@dataclass
class Prediction:
    """Everything predicted for one volume, in the volume's array order ``[X, Y, Z]``.

    seg            ``[X, Y, Z]`` uint8, argmax of the mean prediction (bundles
                   that blend logits: of the members' mean logits, as nnU-Net)
    prob           ``[K, X, Y, Z]`` float32, mean prediction p̄
    tu, au, eu     ``[X, Y, Z]`` float32, nats
    au_sample, au_latent  ``[X, Y, Z]`` float32, AU = AU_sample + AU_latent
    sample_counts  ``[M, S, K]`` float64, voxels per class in each coherent sample
    sample_labels  ``[M, S, X, Y, Z]`` uint8 with ``want_samples``, else None
    member_foreground  ``[X, Y, Z]`` bool: some member's argmax is a foreground
                   class (what the ``foreground`` aggregator averages over)
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
    member_foreground: npt.NDArray[np.bool_] | None
    report: Report


def predict_volume(
    volume: Volume,
    bundle: Bundle | str | os.PathLike[str] | None = None,
    *,
    runtime: Runtime | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    want_samples: bool = False,
    progress: ProgressFn | None = None,
    overlap: float = DEFAULT_OVERLAP,
    exact_scores: bool = False,
) -> Prediction:
    """Segment ``volume`` and decompose its uncertainty.

    ``bundle``: a ``Bundle``, a shipped name or a folder (default bundle when
    ``None``); ignored when ``runtime`` is given (its bundle is used).
    ``seed``: the noise seed (default: the bundle's seed). ``batch_size``:
    slices per runtime call (default: the runtime's preferred size, 1 on a CPU,
    8 on a GPU or Triton); results are bit-identical for any value.
    ``overlap``: the fraction of the patch neighbouring sliding windows share
    (bundles with ``input.patch``; 0 <= overlap < 1, default 0.5).
    ``exact_scores``: rank every voxel for the scan's entanglement (default: a
    seeded sample of ``uncertainty.SCORE_SAMPLE`` voxels when more qualify).
    Raises ``VolumeError`` for unusable volumes, ``BundleError`` for bad
    bundles, ``PredictError`` for bad options.
    """
    t_start = time.perf_counter()
    check_batch_size(batch_size)
    own_runtime = runtime is None
    if runtime is None:
        runtime = open_runtime(bundle, device="auto")
    try:
        return _run(
            volume, runtime, seed=seed, batch_size=batch_size or runtime.preferred_batch_size,
            overlap=overlap, want_samples=want_samples, progress=progress, t_start=t_start,
            exact_scores=exact_scores,
        )  # fmt: skip
    finally:
        if own_runtime:
            runtime.close()


@dataclass
class _Maps:
    """The steps' result; maps in the order ``[rows, cols, depth]`` of slices along ``axis``.

    (``to_volume_order(a, axis)`` gives ``[X, Y, Z]``; scores are taken in this
    order, as they always were.)
    """

    axis: int
    dec: uncertainty.Decomposition
    counts: npt.NDArray[np.float64]
    labels: npt.NDArray[np.uint8] | None
    voxel_ml: float  # of the grid ``counts`` were counted on
    normalize_s: float
    model_s: float
    accumulate_s: float
    geometry: FrameInfo
    # Bundles that blend logits: nnU-Net's segmentation, the argmax of the members'
    # mean logits (None: the argmax of the mean prediction)
    seg: npt.NDArray[np.uint8] | None = None


def _run(
    volume: Volume,
    runtime: Runtime,
    *,
    seed: int | None,
    batch_size: int,
    overlap: float,
    want_samples: bool,
    progress: ProgressFn | None,
    t_start: float,
    exact_scores: bool = False,
) -> Prediction:
    """The steps of the module docstring, in order."""
    bundle = runtime.bundle
    man = bundle.manifest
    seed = resolve_seed(seed, man)
    check_channels(man)
    check_overlap(overlap)
    # The reader's findings first (zero pixdim, odd voxel sizes, huge intensities).
    warnings: list[str] = [str(w) for w in volume.meta.get("warnings", [])]
    volume, n_bad = clean(volume, warnings)
    volume = pin_slice_axis(volume, man)
    crop = plan_crop(volume, man)
    work = volume if crop is None else crop.volume(volume)
    frame = plan_frame(work, man)
    as_stored = frame.identity and man.input.patch is None and man.input.dims == 2
    if as_stored and crop is None and not man.input.normalization.nonzero:
        maps = _slices(work, frame, runtime, seed, batch_size, want_samples, progress, warnings)
    else:
        maps = _windows(
            work, frame, runtime, seed=seed, batch_size=batch_size, overlap=overlap,
            want_samples=want_samples, progress=progress, warnings=warnings,
        )  # fmt: skip
    if crop is not None:
        maps = _uncropped(maps, crop, volume.voxel_volume_ml)

    t0 = time.perf_counter()
    dec = maps.dec
    seg = segment(dec.mean) if maps.seg is None else maps.seg
    scores = score_prediction(
        dec, seg, maps.counts, man,
        voxel_ml=maps.voxel_ml, bundle_path=bundle.path, warnings=warnings, seed=seed,
        exact_scores=exact_scores,
    )  # fmt: skip
    timings: Timings = {
        "normalize_s": maps.normalize_s,
        "model_s": maps.model_s,
        "accumulate_s": maps.accumulate_s,
        "scores_s": time.perf_counter() - t0,
        "predict_s": time.perf_counter() - t_start,
    }
    report = build_report(
        volume, bundle, runtime, seed=seed, nonfinite_voxels=n_bad, scores=scores,
        timings=timings, warnings=warnings, geometry=maps.geometry,
    )  # fmt: skip
    axis, fg = maps.axis, dec.member_foreground
    return Prediction(
        seg=to_volume_order(seg, axis),
        prob=to_volume_order(dec.mean, axis),
        tu=to_volume_order(dec.tu, axis),
        au=to_volume_order(dec.au, axis),
        eu=to_volume_order(dec.eu, axis),
        au_sample=to_volume_order(dec.au_sample, axis),
        au_latent=to_volume_order(dec.au_latent, axis),
        sample_counts=maps.counts,
        sample_labels=None if maps.labels is None else to_volume_order(maps.labels, axis),
        member_foreground=None if fg is None else to_volume_order(fg, axis),
        report=report,
    )


def _uncropped(maps: _Maps, crop: Crop, voxel_ml: float) -> _Maps:
    """The box's maps on the whole scan's grid: outside, background with p = 1, no uncertainty.

    Each coherent sample counts the cropped-away voxels as background, in the
    units of the grid ``maps.counts`` were counted on.
    """
    counts = maps.counts.copy()
    counts[..., 0] += crop.outside_voxels * voxel_ml / maps.voxel_ml
    return dataclasses.replace(
        maps,
        dec=crop.restore(maps.dec),
        counts=counts,
        labels=None if maps.labels is None else crop.pad(maps.labels),
        seg=None if maps.seg is None else crop.pad(maps.seg),
        geometry={**maps.geometry, "crop": crop.info()},
    )


def _slices(
    volume: Volume, frame: Frame, runtime: Runtime, seed: int, batch_size: int,
    want_samples: bool, progress: ProgressFn | None, warnings: list[str],
) -> _Maps:  # fmt: skip
    """The scan as stored, whole slices: normalised per batch, no copy of the volume."""
    man = runtime.bundle.manifest
    plan = plan_slices(volume, man, batch_size)
    work = plan.working(volume.data)  # a view, no copy
    t0 = time.perf_counter()
    intensity = normalization(work, man, warnings, volume.source)
    t_norm = time.perf_counter() - t0
    batches = iter_batches(work, plan, intensity, seed)
    # A server that reduces sends the members' sums, K + 2 numbers per voxel instead of
    # M x (K + 1); sample labels still need every member's outputs.
    results: Iterator[list[MemberOutputs] | ReducedOutputs] = (
        runtime.infer_many_reduced(batches)
        if runtime.reduces and not want_samples
        else runtime.infer_many(
            batches, want_samples=want_samples, prepare=member_preparer(plan, man)
        )
    )
    acc = accumulate(
        results, plan, man, want_samples=want_samples, progress=progress, source=volume.source
    )
    warnings += bounded_warning(intensity)
    return _Maps(
        plan.axis, acc.dec, acc.counts, acc.labels, volume.voxel_volume_ml, t_norm, acc.model_s,
        acc.accumulate_s, frame.info(None, 1),
    )  # fmt: skip


def _windows(
    volume: Volume, frame: Frame, runtime: Runtime, *, seed: int, batch_size: int,
    overlap: float, want_samples: bool, progress: ProgressFn | None, warnings: list[str],
) -> _Maps:  # fmt: skip
    """Normalise whole, onto the model grid, windows through the graphs, stitch, back."""
    man = runtime.bundle.manifest
    t0 = time.perf_counter()
    data = frame.to_model(normalize_volume(volume.data, man, warnings, volume.source))
    t_norm = time.perf_counter() - t0
    plan = plan_tiles(frame.model_shape, frame.slice_axis, man, batch_size, overlap)
    # Logit blending takes each member's labels from its blended map, not the runtime.
    want_labels = (want_samples or recount(plan)) and man.input.blend != "logits"
    batches = iter_tiles(plan.working(data), plan, seed, man.input.pad)
    results = runtime.infer_many(batches, want_samples=want_labels)
    st = stitch(
        results, plan, man, want_labels=want_samples, progress=progress, source=volume.source
    )
    t0 = time.perf_counter()
    seg = None
    if st.logits:
        dec, seg = frame.logits_to_input(st.member_mean)
    else:
        dec = frame.to_input(st.member_mean, st.member_entropy)
    labels = None if st.labels is None else frame.labels_to_input(st.labels)
    geometry = frame.info(man.input.patch, plan.per_slice)
    t_back = time.perf_counter() - t0
    return _Maps(
        2, dec, st.counts, labels, frame.model_voxel_ml, t_norm, st.model_s,
        st.accumulate_s + t_back, geometry, seg,
    )  # fmt: skip
