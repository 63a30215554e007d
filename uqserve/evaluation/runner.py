"""Run bundles over the evaluation sets through the runtime interface.

Each 2D image becomes a ``[X, Y, 1]`` volume and goes through one
``uqserve.Predictor`` per bundle with ``want_samples=True`` (the sample
labels feed GED and Hungarian IoU), on the embedded runtime or on Triton
servers. Images stream one at a time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve._progress import ProgressFn
from uqserve.bundle import Bundle
from uqserve.evaluation.core import (
    PAPER_AGGREGATOR,
    BundleEvaluation,
    ImagePrediction,
    convention_for,
    to_convention,
)
from uqserve.evaluation.sets import DataSource, EvalImage, EvaluationError, SetSpec
from uqserve.evaluation.sources import make_source
from uqserve.prediction import Predictor, RuntimeOptions
from uqserve.runtime import Runtime
from uqserve.volumes import Volume

_AFFINE_2D = np.eye(4)


def image_to_volume(image: npt.NDArray[np.float32], name: str) -> Volume:
    """``[1, H, W]`` image -> ``[H, W, 1]`` volume.

    predict feeds slice ``data[:, :, z]`` to the member graphs as ``[H, W]``
    (first array axis = rows), the layout the members were trained on.
    """
    return Volume(
        data=np.ascontiguousarray(image[0][:, :, None], np.float32), affine=_AFFINE_2D, source=name
    )


def volume_map_to_image(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``[..., H, W, 1]`` volume array -> ``[..., H, W]`` image array."""
    return a[..., 0]


def image_seed(base: int, set_name: str, index: int) -> int:
    """A per-image run seed, so images draw independent noise (stable across runs)."""
    digest = hashlib.sha256(f"{base}:{set_name}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def predict_image(
    image: EvalImage, predictor: Predictor, *, seed: int, convention: str
) -> ImagePrediction:
    """One image through every member graph -> maps in the row's convention."""
    if image.volume is not None:
        return predict_case(image, predictor, seed=seed, convention=convention)
    if image.image.shape[0] != 1:
        raise EvaluationError(
            f"{image.name}: {image.image.shape[0]} channels; evaluate runs single-channel images"
        )
    vol = image_to_volume(image.image, image.name)
    p = predictor.predict(vol, seed=seed, want_samples=True)
    tu, au, eu = to_convention(
        convention,
        tu=volume_map_to_image(p.tu),
        au=volume_map_to_image(p.au),
        eu=volume_map_to_image(p.eu),
        au_sample=volume_map_to_image(p.au_sample),
        au_latent=volume_map_to_image(p.au_latent),
    )
    samples = None if p.sample_labels is None else volume_map_to_image(p.sample_labels)
    member_fg = p.member_foreground
    return ImagePrediction(
        prob=volume_map_to_image(p.prob).astype(np.float32),
        tu=tu.astype(np.float32),
        au=au.astype(np.float32),
        eu=eu.astype(np.float32),
        samples=None if samples is None else samples.astype(np.uint8),
        member_foreground=None
        if member_fg is None
        else volume_map_to_image(np.asarray(member_fg)).astype(bool),
        au_sample=volume_map_to_image(p.au_sample).astype(np.float32),
        au_latent=volume_map_to_image(p.au_latent).astype(np.float32),
    )


def predict_case(
    image: EvalImage, predictor: Predictor, *, seed: int, convention: str
) -> ImagePrediction:
    """One whole scan (``image.volume``) through predict -> maps ``[X, Y, Z]`` on its grid.

    No sample label maps are kept (GED and Hungarian IoU are per-2D-image
    metrics; a volume's samples would not fit in memory for large scans).
    """
    assert image.volume is not None
    p = predictor.predict(image.volume, seed=seed)
    tu, au, eu = to_convention(
        convention, tu=p.tu, au=p.au, eu=p.eu, au_sample=p.au_sample, au_latent=p.au_latent
    )
    return ImagePrediction(
        prob=p.prob.astype(np.float32, copy=False),
        tu=tu.astype(np.float32, copy=False),
        au=au.astype(np.float32, copy=False),
        eu=eu.astype(np.float32, copy=False),
        member_foreground=None if p.member_foreground is None else np.asarray(p.member_foreground),
        au_sample=p.au_sample.astype(np.float32, copy=False),
        au_latent=p.au_latent.astype(np.float32, copy=False),
    )


def run_bundle(
    bundle: Bundle,
    source: DataSource,
    *,
    split: str = "test",
    runtime: Runtime | None = None,
    servers: Sequence[str] | None = None,
    device: str = "auto",
    aggregator: str = PAPER_AGGREGATOR,
    seed: int | None = None,
    progress: ProgressFn | None = None,
) -> BundleEvaluation:
    """Run one bundle over the validation set and ``source.sets(split)``.

    The images go through one :class:`~uqserve.Predictor`: on ``runtime`` when
    given (left open), else on Triton ``servers`` or in-process on ``device``.
    ``progress(task, done, total)`` is called per image (``task``: ``"  <bundle>: <set>"``)
    and per set (``task``: ``"<bundle> (<combination>)"``).
    """
    man = bundle.manifest
    ev = BundleEvaluation(
        num_classes=man.num_classes,
        convention=convention_for(man.num_members, man.num_samples),
        aggregator=aggregator,
        seed=man.seed if seed is None else seed,
    )
    base_seed = man.seed if seed is None else seed
    report = progress or _silent
    options = RuntimeOptions(device=device, servers=tuple(servers or ()))
    with Predictor(
        bundle, None if runtime is not None else options, runtime=runtime
    ) as predictor:  # fmt: skip
        specs = [SetSpec("val", "val"), *source.sets(split)]
        bundle_task = f"{man.name} ({man.combination})"
        report(bundle_task, 0, len(specs))
        for k, spec in enumerate(specs):
            task, total = f"  {man.name}: {spec.name}", source.count(spec, split)
            report(task, 0, total)
            for i, img in enumerate(source.images(spec, split)):
                pred = predict_image(
                    img,
                    predictor,
                    seed=image_seed(base_seed, f"{split}/{spec.name}", img.index),
                    convention=ev.convention,
                )
                ev.add(spec, img, pred)
                report(task, i + 1, total)
            if spec.kind == "val":
                ev.finish_validation()
            report(bundle_task, k + 1, len(specs))
    return ev


def _silent(task: str, done: int, total: int) -> None:
    pass


def source_for(bundle: Bundle, data: str | os.PathLike[str], options: dict[str, Any]) -> DataSource:
    """The data source for one bundle (synthetic images default to the bundle's tile size)."""
    man = bundle.manifest
    if man.input.channels != 1:
        raise EvaluationError(
            f"{bundle.path}: the bundle takes {man.input.channels} channels; "
            "evaluate runs single-channel images"
        )
    opts = dict(options)
    if opts.get("size") is None:
        opts["size"] = man.input.tile_size
    # A bundle with geometry never sees slices cut out as 1 mm 2D images (inputs
    # it was never meant for): a folder's cases run whole, through predict's geometry.
    opts["volumes"] = str(data) != "synthetic" and has_geometry(bundle)
    return make_source(data, num_classes=man.num_classes, **opts)


def has_geometry(bundle: Bundle) -> bool:
    """Whether ``bundle`` needs whole scans: 3D windows, a target spacing or orientation."""
    inp = bundle.manifest.input
    return inp.dims == 3 or inp.spacing is not None or inp.orientation is not None


def bundle_info(bundle: Bundle) -> dict[str, Any]:
    man = bundle.manifest
    return {
        "name": man.name,
        "path": str(bundle.path),
        "combination": man.combination,
        "au": man.au,
        "eu": man.eu,
        "num_members": man.num_members,
        "num_samples": man.num_samples,
        "classes": list(man.classes),
        "manifest_version": man.manifest_version,
        "manifest_sha256": bundle.manifest_sha256,
    }
