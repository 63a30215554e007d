"""Export a checkpoint folder written by ``uqserve train`` as a bundle."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from uqserve.bundle import Bundle, InputSpec, Normalization
from uqserve.checkpoints import CONFIG_NAME, Checkpoints, load_checkpoints, read_checkpoint_config
from uqserve.contracts import default_class_names
from uqserve.exporting._plan import ExportError, ExportPlan, bundle_name
from uqserve.exporting._torch import export_networks
from uqserve.exporting._writer import Calibrator, Say
from uqserve.models.config import ModelConfig


def _normalization(cfg: dict[str, Any]) -> Normalization:
    norm = cfg.get("normalization") or {}
    if isinstance(norm, dict):
        clip = norm.get("clip")
        return Normalization(
            scheme=str(norm.get("scheme", "fixed")),
            mean=float(norm.get("mean", 0.0)),
            std=float(norm.get("std", 1.0)),
            clip=(float(clip[0]), float(clip[1])) if clip is not None else None,
        )
    mean, std = norm
    return Normalization(scheme="fixed", mean=float(mean), std=float(std))


def _class_names(ck: Checkpoints, classes: Sequence[str] | None) -> tuple[str, ...]:
    k = ck.model_config.num_classes
    source = ck.path / CONFIG_NAME
    if classes is not None and len(classes) != k:
        raise ExportError(
            f"{source}: the model has {k} classes but "
            f"{len(classes)} class names were given ({', '.join(classes)})"
        )
    names = tuple(classes or ck.config.get("classes") or default_class_names(k))
    if len(names) != k:
        raise ExportError(f"{source}: {len(names)} class names for {k} classes")
    return names


def _num_members(ck: Checkpoints, num_members: int | None) -> int:
    """Bundle members: trained networks (ensemble), frozen masks (MC dropout),
    weight draws (SWAG), or 1."""
    if ck.eu == "ensemble":
        return len(ck.files) if num_members is None else num_members
    if ck.eu == "mcdropout":
        tc = ck.config.get("train_config", {})
        return int(num_members or ck.config.get("bundle_members") or tc.get("num_masks") or 10)
    if ck.eu in ("swag", "swagdiag"):
        return int(num_members or ck.config.get("bundle_members") or 10)
    return 1


def _swag_draws(ck: Checkpoints, draws: int, seed: int) -> list[Any]:
    """``draws`` copies of the SWA-mean network with SWAG weight draws ``0 .. draws-1``."""
    import copy

    from uqserve.models import swag

    path = ck.path / str(ck.config.get("swag", {}).get("file", swag.FILE_NAME))
    if not path.is_file():
        raise ExportError(f"{path}: SWAG statistics missing; re-run `uqserve train`")
    try:
        stats = swag.SwagStats.load(path)
        return [
            swag.load_parameters(copy.deepcopy(ck.networks[0]), swag.draw_weights(stats, d, seed))
            for d in range(draws)
        ]
    except ValueError as exc:
        raise ExportError(str(exc)) from exc


def _input_spec(cfg: dict[str, Any], mc: ModelConfig, tile: Sequence[int]) -> InputSpec:
    """The manifest input: 2D tiles, or (``dims`` 3) the training patch, spacing and axes."""
    spec = InputSpec(
        channels=mc.in_channels,
        tile_size=(int(tile[0]), int(tile[1])),
        multiple=mc.multiple,
        normalization=_normalization(cfg),
    )
    if mc.dims == 2:
        return spec
    geometry = InputSpec(
        channels=mc.in_channels,
        tile_size=spec.tile_size,
        multiple=mc.multiple,
        dims=3,
        patch=tuple(int(v) for v in cfg["patch"]),
        spacing=tuple(float(v) for v in cfg["spacing"]),
        orientation=cfg.get("orientation"),
        normalization=spec.normalization,
    )
    if problems := geometry.problems():
        raise ExportError(f"{CONFIG_NAME}: " + "; ".join(problems))
    return geometry


def export_checkpoints(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    num_members: int | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    name: str | None = None,
    classes: Sequence[str] | None = None,
    tile_size: tuple[int, int] | None = None,
    calibrate: Calibrator | None = None,
    overwrite: bool = False,
    exporter: str = "torchscript",
    progress: Say | None = None,
) -> Bundle:
    """Export a folder written by ``uqserve train`` (``config.json`` + weight files).

    ``num_members`` applies to MC dropout (how many frozen masks; default 10 or
    the training config's), to SWAG (how many weight draws, seeded by the
    bundle seed; default the training config's) and to ensembles (the first ``num_members`` trained
    members; default all). ``calibrate``: e.g. ``uqserve.calibration.calibrate_bundle``;
    ``None`` writes the bundle uncalibrated (3D bundles always are).
    """
    ck = read_checkpoint_config(ckpt_dir)  # cheap checks before torch loads anything
    name = bundle_name(name, out_dir)
    names = _class_names(ck, classes)
    m = _num_members(ck, num_members)
    ck = load_checkpoints(ckpt_dir, members=m if ck.eu == "ensemble" else None)
    mc, cfg = ck.model_config, ck.config
    tc = cfg.get("train_config", {})
    tile = tile_size or tuple(cfg.get("tile_size") or tc.get("size") or (64, 64))[-2:]
    plan = ExportPlan(
        name=name,
        au=ck.au,
        eu=ck.eu,
        num_members=m,
        num_samples=int(num_samples or mc.num_samples) if ck.au != "softmax" else 1,
        classes=names,
        input=_input_spec(cfg, mc, tile),
        seed=int(cfg.get("seed", 0) if seed is None else seed),
        extra={
            "model_config": mc.to_dict(),
            "source": "checkpoints",
            "exporter": exporter,
            # Calibration slices are drawn like the training images (same object scale).
            "calibration_size": int(tc.get("image_size") or max(int(tile[0]), int(tile[1]))),
            "training": {k: cfg[k] for k in ("validation", "data") if k in cfg},
        },
    )
    if mc.dims == 3 and calibrate:
        # Calibration draws synthetic 2D slices; a volumetric bundle ships uncalibrated.
        calibrate = None
        if progress is not None:
            progress("3D bundle: not calibrated (calibration draws 2D slices)")
    nets = ck.networks
    if ck.eu in ("swag", "swagdiag"):
        nets = _swag_draws(ck, m, plan.seed)
        plan.extra["swag"] = {**cfg.get("swag", {}), "draw_seed": plan.seed, "scale": 1.0}
    return export_networks(
        nets,
        out_dir,
        plan,
        mc,
        overwrite=overwrite,
        calibrate=calibrate,
        exporter=exporter,
        progress=progress,
    )
