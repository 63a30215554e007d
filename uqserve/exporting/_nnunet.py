"""nnU-Net v2 trained model folders as bundles: each fold one softmax member.

A trained nnU-Net v2 model (``<trainer>__<plans>__<configuration>/`` with
``dataset.json``, ``plans.json`` and ``fold_k/checkpoint_final.pth``) is a
deep ensemble of softmax networks. :func:`export_nnunet` rebuilds each fold's
network with nnU-Net's own loader (``nnUNetPredictor.initialize_from_trained_model_folder``:
the trainer's ``build_network_architecture``, i.e. ``dynamic_network_architectures``),
wraps it into uqserve's member contract and exports it to ONNX:

- each fold is exported as a plain logits graph in uqserve's axis order
  (``_nnunet_member.NnunetLogits``: nnU-Net reads images with SimpleITK, whose
  array axes are the NIfTI axes reversed, and permutes them by
  ``transpose_forward``; the graph permutes its input into nnU-Net's order and
  the logits back) and wrapped into the member contract with the ONNX wrapper
  (softmax, entropy, counts, labels). 2d models get slices ``[B, C, rows,
  cols]``; 3d models (3d_fullres) volumes ``[B, C, D, H, W]`` = ``(z, y, x)``;
- with ``mirror=True`` nnU-Net's test-time mirroring is baked into the graph:
  the logits of every flip combination of the checkpoint's
  ``inference_allowed_mirroring_axes`` are averaged before the softmax, as
  nnU-Net's predictor does;
- normalisation: ``CTNormalization`` becomes ``ct`` with the dataset's
  foreground ``percentile_00_5``/``percentile_99_5`` as clip and its foreground
  mean/std; ``ZScoreNormalization`` becomes per-scan ``zscore`` (``nonzero``
  with nnU-Net's ``use_mask_for_norm``);
- geometry: ``patch`` (sliding windows, overlap 0.5) and the ``spacing`` of
  the configuration, in uqserve's axis order; as nnU-Net's predictor, a scan
  smaller than the patch is padded with 0 after normalisation, centred
  (``input.pad``), and windows are blended in logit space (``input.blend``)
  with nnU-Net's float16 Gaussian (``input.gaussian``);
- class names come from ``dataset.json`` (ordered by label value).

The bundle is written **uncalibrated**: synthetic calibration data mean
nothing for a real model; calibrate it on your own validation cases with
``uqserve calibrate BUNDLE --data DIR``. Everything nnU-Net's plans say about
geometry (patch, spacing, ``transpose_forward``/``backward``, normalisation
schemes and intensity properties, mirroring axes) is kept in
``manifest.extra["nnunet"]``.

nnunetv2 is imported lazily (the ``nnunet`` extra).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uqserve.bundle import Bundle, InputSpec, Normalization, Padding, load_bundle
from uqserve.exporting._nnunet_files import initialize_predictor, load_checkpoint, read_json
from uqserve.exporting._plan import OPSET, ExportError, ExportPlan, bundle_name
from uqserve.exporting._writer import Say, atomic_bundle_dir, finish_bundle

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PARITY_ATOL", "NnunetModel", "export_nnunet", "load_nnunet_model"]

#: Max |p_onnx - p_torch| of one window: nnU-Net's deep networks (6 stages, up
#: to 320 features, 128^3 windows) differ by up to ~1e-3 in probability between
#: onnxruntime's and PyTorch's float32 convolutions; a wrong export (axes,
#: weights) differs by 0.1 or more.
PARITY_ATOL = 2e-3


@dataclass
class NnunetModel:
    """One nnU-Net model folder, read: fold networks and what the plans say.

    networks     one ``nn.Module`` per fold (eval mode, no deep supervision)
    dims         2 (slices) or 3 (volumes)
    patch        the window in uqserve's axis order: ``(rows, cols)`` of a slice
                 (nnU-Net's 2d patch reversed) or ``(D, H, W)`` = ``(z, y, x)``
    spacing      the training voxel size along those axes, mm
    perm         nnU-Net's spatial axis ``j`` is uqserve's axis ``perm[j]``
    multiple     window sizes must be multiples of this (the network's total stride)
    info         everything for ``manifest.extra["nnunet"]``
    """

    folder: Path
    configuration: str
    folds: tuple[str, ...]
    networks: list[nn.Module]
    mirror_axes: tuple[int, ...]
    classes: tuple[str, ...]
    channels: int
    normalization: Normalization
    dims: int
    patch: tuple[int, ...]
    spacing: tuple[float, ...]
    perm: tuple[int, ...]
    multiple: int
    info: dict[str, Any] = field(default_factory=dict)


def _import_nnunet() -> Any:
    """nnunetv2's predictor class, or a clear error when the extra is missing."""
    try:
        # nnunetv2.paths prints warnings about unset nnUNet_* variables at import.
        with contextlib.redirect_stdout(io.StringIO()):
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as exc:
        raise ExportError(
            f"exporting an nnU-Net model needs nnunetv2 ({exc}); "
            "install it with: pip install 'uqserve[nnunet]'"
        ) from exc
    return nnUNetPredictor


def _check_folder(folder: Path, folds: Sequence[str] | None, checkpoint: str) -> tuple[str, ...]:
    """The folds to export; every file they need must exist."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder; pass nnU-Net's trained model folder")
    for name in ("dataset.json", "plans.json"):
        if not (folder / name).is_file():
            raise ExportError(
                f"{folder}: no {name}; pass the folder <trainer>__<plans>__<configuration> "
                "that nnUNetv2_train wrote"
            )
    if folds is None:
        found = sorted(p.name[len("fold_") :] for p in folder.glob("fold_*") if p.is_dir())
        folds = [f for f in found if (folder / f"fold_{f}" / checkpoint).is_file()]
        if not folds:
            raise ExportError(f"{folder}: no fold_*/{checkpoint}; train a fold or pass checkpoint")
    for f in folds:
        if f != "all" and not f.isdigit():
            raise ExportError(f"folds: {f!r} is not a fold number (0, 1, ... or all)")
        path = folder / f"fold_{f}" / checkpoint
        if not path.is_file():
            raise ExportError(f"{path}: no such checkpoint; check folds and checkpoint")
    return tuple(str(f) for f in folds)


def _configuration(folder: Path, plans: dict[str, Any], fold: str, checkpoint: str) -> str:
    """The configuration: the folder name's last part, else the checkpoint's (as nnU-Net)."""
    name = folder.name.split("__")[-1]
    if name in plans.get("configurations", {}):
        return name
    # A checkpoint of the user's own training: nnU-Net reads the same key.
    ckpt = load_checkpoint(folder / f"fold_{fold}" / checkpoint)
    return str(ckpt["init_args"]["configuration"])


def _refuse_unsupported(plans: dict[str, Any], configuration: str, folder: Path) -> None:
    """One clear reason for a configuration uqserve cannot serve."""
    conf = plans.get("configurations", {}).get(configuration)
    if conf is None:
        raise ExportError(f"{folder}: plans.json has no configuration {configuration!r}")
    if conf.get("previous_stage"):
        raise ExportError(
            f"{folder}: {configuration} is a cascade stage (it takes the "
            f"{conf['previous_stage']} prediction as input); uqserve exports single-stage "
            "models: export the 3d_fullres or 2d configuration instead"
        )
    if conf.get("next_stage"):
        raise ExportError(
            f"{folder}: {configuration} is the first stage of a cascade (its output is "
            "the next stage's input); export the 3d_fullres or 2d configuration instead"
        )


def _normalization(pm: Any, cm: Any, folder: Path) -> Normalization:
    """The one channel's normalisation in uqserve's terms."""
    schemes = list(cm.normalization_schemes)
    if len(schemes) != 1:
        raise ExportError(
            f"{folder}: the model takes {len(schemes)} input channels; uqserve bundles "
            "normalise one channel so far"
        )
    scheme, masked = schemes[0], bool(cm.use_mask_for_norm[0])
    props = pm.foreground_intensity_properties_per_channel.get("0", {})
    if scheme == "CTNormalization":
        lo, hi = float(props["percentile_00_5"]), float(props["percentile_99_5"])
        std = max(float(props["std"]), 1e-8)  # nnU-Net's guard
        return Normalization(scheme="ct", mean=float(props["mean"]), std=std, clip=(lo, hi))
    if scheme == "ZScoreNormalization":
        return Normalization(scheme="zscore", nonzero=masked)
    if scheme == "NoNormalization":
        return Normalization(scheme="fixed", mean=0.0, std=1.0)
    if scheme == "RGBTo01Normalization":
        return Normalization(scheme="fixed", mean=0.0, std=255.0)
    raise ExportError(f"{folder}: normalisation {scheme} is not supported")


def _classes(lm: Any, folder: Path) -> tuple[str, ...]:
    """Class names by label value, without nnU-Net's ignore label."""
    if lm.has_regions:
        raise ExportError(
            f"{folder}: region-based labels (sigmoid outputs) are not supported; "
            "uqserve members are softmax over exclusive classes"
        )
    by_value = {int(v): str(k) for k, v in lm.label_dict.items() if not isinstance(v, list | tuple)}
    labels = [v for v in sorted(by_value) if v != lm.ignore_label]
    if labels != list(range(lm.num_segmentation_heads)):
        raise ExportError(
            f"{folder}: dataset.json labels {labels} are not 0..{lm.num_segmentation_heads - 1}"
        )
    return tuple(by_value[v] for v in labels)


def _total_stride(arch_kwargs: dict[str, Any], dims: int) -> int:
    """The least common multiple of the network's total stride along each axis."""
    strides = arch_kwargs.get("strides") or [[1] * dims]
    per_axis = [math.prod(int(s[a]) if isinstance(s, list | tuple) else int(s) for s in strides)
                for a in range(dims)]  # fmt: skip
    return math.lcm(*per_axis)


def load_nnunet_model(
    folder: str | os.PathLike[str],
    *,
    folds: Sequence[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
) -> NnunetModel:
    """Read an nnU-Net v2 trained model folder: plans, labels and one network per fold.

    ``folds``: e.g. ``("0", "1")``; default every ``fold_*`` with ``checkpoint``.
    Raises :class:`ExportError` naming the file and the reason for anything
    uqserve cannot serve (cascades, region-based labels, several channels).
    """
    import copy

    folder = Path(folder)
    fold_list = _check_folder(folder, folds, checkpoint)
    predictor_cls = _import_nnunet()
    import torch

    plans = read_json(folder / "plans.json")
    configuration = _configuration(folder, plans, fold_list[0], checkpoint)
    _refuse_unsupported(plans, configuration, folder)
    # nnU-Net prints notes on stdout; they must not mix with our output (--json).
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = predictor_cls(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        # Not nnU-Net's initialize_from_trained_model_folder: it unpickles with full pickle.
        initialize_predictor(predictor, folder, fold_list, checkpoint)
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    lm = pm.get_label_manager(predictor.dataset_json)
    tf = [int(a) for a in pm.transpose_forward]
    patch, spacing = [int(p) for p in cm.patch_size], [float(v) for v in cm.spacing]
    dims = len(patch)
    if dims == 2 and tf[1:] != sorted(tf[1:]):
        raise ExportError(
            f"{folder}: transpose_forward {tf} reorders the in-slice axes; uqserve slices "
            "keep them in order (nnU-Net's default planners do)"
        )
    networks = []
    for params in predictor.list_of_parameters:
        net = copy.deepcopy(predictor.network)
        net.load_state_dict(params)
        networks.append(net.eval())
    mirror_axes = tuple(int(a) for a in (predictor.allowed_mirroring_axes or ()))
    norm = _normalization(pm, cm, folder)
    info = {
        "configuration": configuration,
        "trainer": predictor.trainer_name,
        "plans_name": pm.plans_name,
        "dataset_name": pm.dataset_name,
        "folds": list(fold_list),
        "checkpoint": checkpoint,
        "patch_size": patch,
        "spacing": spacing,
        "transpose_forward": tf,
        "transpose_backward": [int(a) for a in pm.transpose_backward],
        "normalization_schemes": list(cm.normalization_schemes),
        "use_mask_for_norm": [bool(v) for v in cm.use_mask_for_norm],
        "foreground_intensity_properties_per_channel": dict(
            pm.foreground_intensity_properties_per_channel
        ),
        "mirror_axes": list(mirror_axes),
        # nnU-Net's image arrays are SimpleITK's: the NIfTI array axes reversed.
        "slice_axis": 2 - tf[0],
    }
    # uqserve's volume axes (D, H, W) are SimpleITK's (z, y, x); nnU-Net's are
    # those permuted by transpose_forward. A slice's (rows, cols) are the
    # NIfTI axes in increasing order, nnU-Net's in-slice axes reversed.
    perm = tuple(tf) if dims == 3 else (1, 0)
    back = [perm.index(a) for a in range(dims)]
    return NnunetModel(
        folder=folder, configuration=configuration, folds=fold_list, networks=networks,
        mirror_axes=mirror_axes, classes=_classes(lm, folder),
        channels=len(cm.normalization_schemes), normalization=norm, dims=dims,
        patch=tuple(patch[j] for j in back), spacing=tuple(spacing[j] for j in back),
        perm=perm, multiple=_total_stride(cm.network_arch_init_kwargs, dims), info=info,
    )  # fmt: skip


def logits_graphs(model: NnunetModel, mirror: bool) -> list[nn.Module]:
    """One :class:`NnunetLogits` per fold (``mirror``: bake in test-time mirroring)."""
    from uqserve.exporting._nnunet_member import NnunetLogits

    axes = model.mirror_axes if mirror else ()
    return [NnunetLogits(net, model.perm, axes) for net in model.networks]


def export_nnunet(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    folds: Sequence[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    mirror: bool = False,
    name: str | None = None,
    overwrite: bool = False,
    progress: Say | None = None,
) -> Bundle:
    """Export an nnU-Net v2 trained model folder as an uncalibrated bundle.

    Each fold becomes one softmax member (two or more folds: a deep ensemble,
    ``eu = ensemble``; one: ``eu = none``): its network, in uqserve's axis
    order, exported to ONNX and wrapped into the member contract. Every member
    is checked against PyTorch through the runtime interface before the bundle
    is written atomically. Calibrate the result with
    :func:`uqserve.calibration.calibrate` on your own validation cases.
    """
    import onnx

    from uqserve.exporting._onnx import wrap_onnx_member

    say = progress or (lambda _msg: None)
    name = bundle_name(name, out_dir)
    model = load_nnunet_model(model_dir, folds=folds, checkpoint=checkpoint)
    say(f"read {model.configuration} folds {', '.join(model.folds)} of {model.folder.name}")
    graphs = logits_graphs(model, mirror)
    n, k = len(graphs), len(model.classes)
    plan = ExportPlan(
        name=name,
        au="softmax",
        eu="ensemble" if n > 1 else "none",
        num_members=n,
        num_samples=1,
        classes=model.classes,
        # nnU-Net's geometry: windows of the patch, resampled to the training
        # spacing (cubic, nearest along a thick axis), as stored (no world
        # orientation: nnU-Net keeps the array axes as read).
        input=InputSpec(
            channels=model.channels,
            tile_size=(model.patch[-2], model.patch[-1]),
            multiple=model.multiple,
            dims=model.dims,
            patch=model.patch,
            spacing=model.spacing,
            orientation=None,
            interpolation="cubic",
            normalization=model.normalization,
            crop_nonzero=True,  # nnU-Net crops every case to its nonzero bounding box
            # 2d: slices along the plans' axis (transpose_forward[0]), not the scan's thickest
            slice_axis=int(model.info["slice_axis"]) if model.dims == 2 else None,
            # nnU-Net's predictor: pad the normalised image with 0, centred
            # (pad_nd_image), blend the windows' logits with its float16 Gaussian
            pad=Padding(mode="constant", value=0.0, centre=True),
            blend="logits",
            gaussian="nnunet",
        ),
        extra={"source": "nnunet", "nnunet": {**model.info, "mirror": bool(mirror)}},
    )
    with atomic_bundle_dir(out_dir, overwrite) as tmp:
        files = [f"member_{m}.onnx" for m in range(n)]
        for graph, f in zip(graphs, files, strict=True):
            plain = tmp / f"{f}.logits"
            _export_logits(graph, plain, model)
            wrapped, _, _ = wrap_onnx_member(
                plain, num_classes=k, outputs="logits", dims=model.dims, keep_logits=True
            )
            plain.unlink()
            onnx.save(wrapped, str(tmp / f))
        check = functools.partial(_check_against_torch, graphs=graphs, model=model, say=say)
        finish_bundle(tmp, plan, files, OPSET, calibrate=None, check=check, say=say)
    return load_bundle(out_dir, verify=True)


def _export_logits(graph: nn.Module, path: Path, model: NnunetModel) -> None:
    """``graph`` as a plain ONNX graph ``image [B, C, *spatial] -> logits [B, K, *spatial]``."""
    import warnings

    import torch

    spatial = {i + 2: f"S{i}" for i in range(model.dims)}
    example = torch.zeros(1, model.channels, *model.patch)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "B", **spatial}, "logits": {0: "B", **spatial}},
        )  # fmt: skip


def _check_against_torch(
    bundle: Bundle, graphs: Sequence[nn.Module], model: NnunetModel, say: Say
) -> None:
    """Each member, run by onnxruntime, against softmax of its PyTorch logits (one window)."""
    import numpy as np
    import torch

    from uqserve.runtime import Batch
    from uqserve.runtime.embedded import EmbeddedRuntime

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, model.channels, *model.patch)).astype(np.float32)
    batch = Batch(
        image=image,
        seed=np.zeros(1, np.int64),
        offset=np.zeros((1, 3), np.int64),
        valid=np.array([model.patch], np.int64),
    )
    with EmbeddedRuntime(bundle, device="cpu", threads=1, workers=1) as rt:
        outs = rt.infer(batch)
    for m, (graph, out) in enumerate(zip(graphs, outs, strict=True)):
        with torch.no_grad():
            ref = torch.softmax(graph(torch.from_numpy(image)), dim=1).numpy()
        diff = float(np.abs(out.mean - ref).max())
        if not np.isfinite(diff) or diff > PARITY_ATOL:
            raise ExportError(
                f"{model.folder}: fold {model.folds[m]}: ONNX and PyTorch differ by {diff:.3g} "
                f"(> {PARITY_ATOL:g}); the export is wrong: report it with the plans.json"
            )
        say(f"fold {model.folds[m]}: exported, parity max |diff| {diff:.2g}")
