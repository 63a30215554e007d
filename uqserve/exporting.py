"""Export trained members to ONNX, check parity, calibrate and write bundles.

Three routes lead to a bundle (a folder with ``manifest.json`` and one ONNX
graph per member, see ``docs/architecture.md``):

- :func:`export_recipe`: a TOML recipe under ``export/`` — train, then export;
- :func:`export_checkpoints`: a folder written by ``uqserve train``;
- :func:`export_onnx_members`: your own ONNX graphs (``[B,C,H,W] -> [B,K,H,W]``),
  wrapped into the member contract with the onnx API (no torch needed).

Every member graph is checked against PyTorch under identical noise (max abs
difference <= 1e-4) before the bundle is written, and the bundle is written
atomically (a temp folder next to the target, renamed at the end).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from uqserve import __version__
from uqserve._fs import replace_dir_atomically
from uqserve.bundle import (
    Bundle,
    InputSpec,
    Manifest,
    Member,
    Normalization,
    OODSpec,
    load_bundle,
    sha256_file,
    write_manifest,
)
from uqserve.contracts import (
    AGGREGATORS,
    MEMBER_INPUTS,
    MEMBER_OUTPUTS,
    PAPER_SHIFTS,
    default_class_names,
)
from uqserve.models.config import ModelConfig, parse_combination

if TYPE_CHECKING:
    import onnx
    from torch import nn

OPSET = 18
PARITY_ATOL = 1e-4


class ExportError(ValueError):
    """An export that cannot proceed; the message names the file and the fix."""


# --------------------------------------------------------------------------- members


def export_member(
    graph: nn.Module,
    path: str | os.PathLike[str],
    *,
    in_channels: int,
    num_classes: int,
    num_samples: int,
    example_size: tuple[int, int] = (32, 32),
    exporter: str = "torchscript",
) -> Path:
    """Export one :class:`~uqserve.models.member.MemberGraph` to ONNX (opset 18).

    ``exporter="torchscript"`` (default: 0.5 s per member on 2 cores) or
    ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, about 15 s per member).
    B, H and W are dynamic; all four inputs are present even where a method
    ignores one (softmax ignores ``seed`` and ``offset``).
    """
    import onnx
    import torch

    path = Path(path)
    h, w = example_size
    args = (
        torch.zeros(2, in_channels, h, w),
        torch.tensor([0, 1], dtype=torch.int64),
        torch.zeros(2, 3, dtype=torch.int64),
        torch.tensor([[h, w], [h, w]], dtype=torch.int64),
    )
    graph = graph.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {
                "image": {0: "B", 2: "H", 3: "W"},
                "seed": {0: "B"},
                "offset": {0: "B"},
                "valid": {0: "B"},
                "mean": {0: "B", 2: "H", 3: "W"},
                "sample_entropy": {0: "B", 1: "H", 2: "W"},
                "sample_counts": {0: "B"},
                "sample_labels": {0: "B", 2: "H", 3: "W"},
            }
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(MEMBER_INPUTS),
                output_names=list(MEMBER_OUTPUTS),
                dynamic_axes=axes,
            )
        elif exporter == "dynamo":
            dyn = torch.export.Dim.DYNAMIC
            shapes = {
                "image": {0: dyn, 2: dyn, 3: dyn},
                "seed": {0: dyn},
                "offset": {0: dyn},
                "valid": {0: dyn},
            }
            prog = torch.onnx.export(
                graph,
                args,
                None,
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                input_names=list(MEMBER_INPUTS),
                output_names=list(MEMBER_OUTPUTS),
                dynamic_shapes=shapes,
            )
            if prog is None:
                raise ExportError("dynamo export returned no program")
            prog.save(str(path), external_data=False)
        else:
            raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    model = onnx.load(str(path))
    conform_signature(model, in_channels, num_classes, num_samples)
    onnx.save(model, str(path))
    return path


def _set_dims(vi: onnx.ValueInfoProto, elem_type: int, dims: Sequence[int | str]) -> None:
    tt = vi.type.tensor_type
    tt.elem_type = elem_type
    tt.shape.ClearField("dim")
    for d in dims:
        dim = tt.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def conform_signature(
    model: onnx.ModelProto, channels: int, num_classes: int, num_samples: int
) -> None:
    """Make ``model``'s inputs and outputs exactly the member contract (in place).

    Adds any of ``image, seed, offset, valid`` the exporter dropped, orders the
    inputs, and writes readable dimension names ``B, H, W`` and the fixed sizes.
    """
    from onnx import TensorProto, helper

    spec_in: dict[str, tuple[int, list[int | str]]] = {
        "image": (TensorProto.FLOAT, ["B", channels, "H", "W"]),
        "seed": (TensorProto.INT64, ["B"]),
        "offset": (TensorProto.INT64, ["B", 3]),
        "valid": (TensorProto.INT64, ["B", 2]),
    }
    spec_out: dict[str, tuple[int, list[int | str]]] = {
        "mean": (TensorProto.FLOAT, ["B", num_classes, "H", "W"]),
        "sample_entropy": (TensorProto.FLOAT, ["B", "H", "W"]),
        "sample_counts": (TensorProto.FLOAT, ["B", num_samples, num_classes]),
        "sample_labels": (TensorProto.UINT8, ["B", num_samples, "H", "W"]),
    }
    g = model.graph
    inits = {i.name for i in g.initializer}
    existing = {vi.name: vi for vi in g.input if vi.name not in inits}
    extra = [vi for vi in g.input if vi.name not in spec_in and vi.name not in inits]
    if extra:
        raise ExportError(f"graph has unexpected inputs {[vi.name for vi in extra]}")
    new_inputs = []
    for name, (dtype, dims) in spec_in.items():
        vi = existing.get(name) or helper.make_tensor_value_info(name, dtype, None)
        _set_dims(vi, dtype, dims)
        new_inputs.append(vi)
    keep_inits = [vi for vi in g.input if vi.name in inits]
    del g.input[:]
    g.input.extend(new_inputs + keep_inits)
    outs = {vi.name: vi for vi in g.output}
    missing = [n for n in spec_out if n not in outs]
    if missing:
        raise ExportError(f"graph lacks outputs {missing}")
    new_outputs = []
    for name, (dtype, dims) in spec_out.items():
        _set_dims(outs[name], dtype, dims)
        new_outputs.append(outs[name])
    del g.output[:]
    g.output.extend(new_outputs)


def parity_feeds(
    channels: int, size: tuple[int, int], batch: int = 2, seed: int = 0
) -> dict[str, npt.NDArray[Any]]:
    """Random member-graph inputs: images, seeds, tile offsets and a partly padded tile."""
    rng = np.random.default_rng(seed)
    h, w = size
    valid = np.tile(np.array([[h, w]], dtype=np.int64), (batch, 1))
    valid[-1] = (max(1, h - 5), max(1, w - 3))
    return {
        "image": rng.normal(size=(batch, channels, h, w)).astype(np.float32),
        "seed": rng.integers(0, 2**40, size=batch, dtype=np.int64),
        "offset": np.stack(
            [np.arange(batch), rng.integers(0, 512, batch), rng.integers(0, 512, batch)], axis=1
        ).astype(np.int64),
        "valid": valid,
    }


def _session(path: str | os.PathLike[str] | bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Export-time checks run small batches: one thread each avoids oversubscription.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        path if isinstance(path, bytes) else str(path), opts, providers=["CPUExecutionProvider"]
    )


def check_parity(
    graph: nn.Module,
    onnx_path: str | os.PathLike[str],
    feeds: dict[str, npt.NDArray[Any]],
    atol: float = PARITY_ATOL,
) -> float:
    """Compare the ONNX graph in onnxruntime with PyTorch on ``feeds`` (identical noise).

    Returns the max abs difference of ``mean`` and ``sample_entropy``; raises
    :class:`ExportError` if it exceeds ``atol`` or if labels differ anywhere the
    PyTorch probabilities are not a near-tie.
    """
    import torch

    ort_out = _session(onnx_path).run(list(MEMBER_OUTPUTS), feeds)
    with torch.no_grad():
        ref = [t.numpy() for t in graph(*(torch.from_numpy(feeds[n]) for n in MEMBER_INPUTS))]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_out[:2], ref[:2], strict=True))
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(
            f"{onnx_path}: ONNX and PyTorch outputs differ by {diff:.3g} (> {atol:g}); "
            "the export is wrong: report it with the model config"
        )
    labels_differ = int((ort_out[3] != ref[3]).sum())
    counts_diff = float(np.abs(ort_out[2] - ref[2]).sum())
    if counts_diff > 2 * labels_differ or labels_differ > 0.001 * ref[3].size + 2:
        raise ExportError(
            f"{onnx_path}: ONNX and PyTorch sample labels differ at {labels_differ} voxels; "
            "the export is wrong: report it with the model config"
        )
    return diff


# --------------------------------------------------------------------------- bundles


@contextmanager
def atomic_bundle_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; rename it to ``target`` on success.

    Refuses an existing ``target`` unless ``overwrite``; on failure nothing is left.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise ExportError(f"{target}: already exists; pass --overwrite to replace it")
    with replace_dir_atomically(target) as tmp:
        yield tmp
        _publish_permissions(tmp)


def _publish_permissions(folder: Path) -> None:
    """mkstemp creates private (0600) files; a bundle is shared data."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _members(folder: Path, files: Sequence[str]) -> tuple[Member, ...]:
    return tuple(Member(file=f, sha256=sha256_file(folder / f)) for f in files)


@dataclass
class ExportPlan:
    """What one bundle is: combination, members, samples, classes, preprocessing."""

    name: str
    au: str
    eu: str
    num_members: int
    num_samples: int
    classes: tuple[str, ...]
    input: InputSpec
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _manifest(plan: ExportPlan, members: tuple[Member, ...], opset: int) -> Manifest:
    return Manifest(
        name=plan.name,
        au=plan.au,
        eu=plan.eu,
        num_members=plan.num_members,
        num_samples=plan.num_samples,
        classes=plan.classes,
        members=members,
        input=plan.input,
        seed=plan.seed,
        opset=opset,
        uqserve_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        extra=plan.extra,
    )


def export_networks(
    nets: Sequence[nn.Module],
    out_dir: str | os.PathLike[str],
    plan: ExportPlan,
    model_config: ModelConfig,
    *,
    overwrite: bool = False,
    calibrate: bool = True,
    exporter: str = "torchscript",
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Export trained networks as one bundle.

    ``nets`` holds one network per member for ``ensemble``, exactly one for
    ``none`` and ``mcdropout`` (whose M members are the frozen dropout masks).
    """
    from uqserve.models import member_graph

    say = progress or (lambda _msg: None)
    if plan.eu == "ensemble" and len(nets) != plan.num_members:
        raise ExportError(
            f"ensemble of {plan.num_members} members needs {plan.num_members} networks, "
            f"got {len(nets)}"
        )
    if plan.eu != "ensemble" and len(nets) != 1:
        raise ExportError(f"eu {plan.eu!r} exports one trained network, got {len(nets)}")
    if plan.eu == "none" and plan.num_members != 1:
        raise ExportError("eu 'none' has exactly one member")
    size = tuple(
        max(32, model_config.multiple * ((32 + model_config.multiple - 1) // model_config.multiple))
        for _ in range(2)
    )
    with atomic_bundle_dir(out_dir, overwrite) as tmp:
        files = []
        for m in range(plan.num_members):
            net = nets[m] if plan.eu == "ensemble" else nets[0]
            graph = member_graph(net, m, plan.num_samples, eu=plan.eu, seed=plan.seed)
            f = f"member_{m}.onnx"
            export_member(
                graph,
                tmp / f,
                in_channels=model_config.in_channels,
                num_classes=model_config.num_classes,
                num_samples=plan.num_samples,
                example_size=(size[0], size[1]),
                exporter=exporter,
            )
            diff = check_parity(
                graph, tmp / f, parity_feeds(model_config.in_channels, (size[0], size[1]), seed=m)
            )
            say(f"member {m}: exported, parity max |diff| {diff:.2g}")
            files.append(f)
        manifest = _manifest(plan, _members(tmp, files), OPSET)
        write_manifest(tmp, manifest)
        if calibrate:
            say("calibrating the OOD threshold on synthetic validation data")
            manifest = calibrate_bundle(Bundle(tmp, manifest))
            write_manifest(tmp, manifest)
        load_bundle(tmp, verify=True)
    return load_bundle(out_dir, verify=True)


# --------------------------------------------------------------------------- checkpoints


def _load_checkpoint_dir(ckpt_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    cfg_path = ckpt_dir / "config.json"
    if not ckpt_dir.is_dir():
        raise ExportError(
            f"{ckpt_dir}: no such checkpoint folder; pass a folder written by `uqserve train`"
        )
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path}: missing; pass a folder written by `uqserve train`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(
            f"{cfg_path}: not valid JSON ({exc.msg}); re-run `uqserve train`"
        ) from exc
    n = int(cfg.get("num_members", 1))
    files = [ckpt_dir / f"member_{m}.safetensors" for m in range(n)]
    for f in files:
        if not f.is_file():
            raise ExportError(
                f"{f}: checkpoint missing ({n} members expected); re-run `uqserve train`"
            )
    return cfg, files


def _load_net(au: str, config: ModelConfig, file: Path) -> nn.Module:
    from safetensors.torch import load_file

    from uqserve.models import build_network

    net = build_network(au, config)
    try:
        state = load_file(str(file))
    except Exception as exc:
        raise ExportError(
            f"{file}: not a readable safetensors checkpoint ({exc}); re-run `uqserve train`"
        ) from exc
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ExportError(f"{file}: weights do not fit the model in config.json ({first})") from exc
    return net.eval()


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
    calibrate: bool = True,
    overwrite: bool = False,
    exporter: str = "torchscript",
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Export a folder written by ``uqserve train`` (``config.json`` + ``member_<m>.safetensors``).

    ``num_members`` applies to MC dropout (how many frozen masks; default 10 or
    the training config's); ensembles export every trained member.
    """
    ckpt = Path(ckpt_dir)
    cfg, files = _load_checkpoint_dir(ckpt)
    try:
        au, eu = parse_combination(str(cfg["combination"]))
        mc = ModelConfig.from_dict(dict(cfg["model_config"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ExportError(
            f"{ckpt / 'config.json'}: malformed ({exc}); re-run `uqserve train`"
        ) from exc
    if classes is not None and len(classes) != mc.num_classes:
        raise ExportError(
            f"{ckpt / 'config.json'}: the model has {mc.num_classes} classes but "
            f"{len(classes)} class names were given ({', '.join(classes)})"
        )
    names = tuple(classes or cfg.get("classes") or default_class_names(mc.num_classes))
    if len(names) != mc.num_classes:
        raise ExportError(
            f"{ckpt / 'config.json'}: {len(names)} class names for {mc.num_classes} classes"
        )
    s = int(num_samples or mc.num_samples) if au != "softmax" else 1
    if eu == "ensemble":
        m = len(files)
        if num_members is not None and num_members != m:
            if num_members > m:
                raise ExportError(
                    f"{ckpt}: asked for {num_members} members but only {m} were trained"
                )
            m = num_members
            files = files[:m]
    elif eu == "mcdropout":
        tc = cfg.get("train_config", {})
        m = int(num_members or cfg.get("bundle_members") or tc.get("num_masks") or 10)
    else:
        m = 1
    bundle_seed = int(cfg.get("seed", 0) if seed is None else seed)
    tc = cfg.get("train_config", {})
    tile = tile_size or tuple(cfg.get("tile_size") or tc.get("size") or (64, 64))[:2]
    plan = ExportPlan(
        name=name or Path(out_dir).name,
        au=au,
        eu=eu,
        num_members=m,
        num_samples=s,
        classes=names,
        input=InputSpec(
            channels=mc.in_channels,
            tile_size=(int(tile[0]), int(tile[1])),
            multiple=mc.multiple,
            normalization=_normalization(cfg),
        ),
        seed=bundle_seed,
        extra={
            "model_config": mc.to_dict(),
            "source": "checkpoints",
            "exporter": exporter,
            # Calibration slices are drawn like the training images (same object scale).
            "calibration_size": int(tc.get("image_size") or max(int(tile[0]), int(tile[1]))),
            "training": {k: cfg[k] for k in ("validation", "data") if k in cfg},
        },
    )
    nets = [_load_net(au, mc, f) for f in files]
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


# --------------------------------------------------------------------------- recipes


@dataclass
class Recipe:
    """An export recipe (``export/<combination>.toml``)."""

    combination: str
    model: ModelConfig
    train: dict[str, Any]
    num_members: int
    num_samples: int
    seed: int = 0
    name: str | None = None
    classes: tuple[str, ...] | None = None
    tile_size: tuple[int, int] | None = None


def _tile(v: Any) -> tuple[int, int]:
    t = (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))
    return t


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Parse and validate a recipe TOML file."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such recipe; see export/*.toml for examples")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ExportError(f"{path}: not valid TOML ({exc})") from exc
    try:
        combination = str(d["combination"])
        parse_combination(combination)
        model = ModelConfig.from_dict(dict(d.get("model", {})))
        bundle = dict(d.get("bundle", {}))
        recipe = Recipe(
            combination=combination,
            model=model,
            train=dict(d.get("train", {})),
            num_members=int(bundle.get("num_members", 1)),
            num_samples=int(bundle.get("num_samples", model.num_samples)),
            seed=int(bundle.get("seed", 0)),
            name=bundle.get("name"),
            classes=tuple(bundle["classes"]) if "classes" in bundle else None,
            tile_size=_tile(bundle["tile_size"]) if "tile_size" in bundle else None,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ExportError(f"{path}: {exc}") from exc
    if recipe.classes is not None and len(recipe.classes) != model.num_classes:
        raise ExportError(
            f"{path}: {len(recipe.classes)} class names but model.num_classes = {model.num_classes}"
        )
    return recipe


def export_recipe(
    recipe_toml: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    work_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    calibrate: bool = True,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Train the recipe's members with :func:`uqserve.training.train`, then export them.

    ``overrides`` replace training-config fields (e.g. ``{"steps": 5}`` for a smoke test).
    """
    from uqserve import training

    recipe = load_recipe(recipe_toml)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite to replace it")
    au, eu = parse_combination(recipe.combination)
    model = replace(recipe.model, num_samples=recipe.num_samples if au != "softmax" else 1)
    train_kwargs = {**recipe.train, **(overrides or {})}
    if eu == "ensemble":
        train_kwargs.setdefault("num_members", recipe.num_members)
    elif eu == "mcdropout":
        train_kwargs.setdefault("num_masks", recipe.num_members)
    try:
        tc = training.TrainConfig(**train_kwargs)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{recipe_toml}: [train] {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="uqserve-train-", dir=work_dir) as tdir:
        ckpt = training.train(
            recipe.combination,
            Path(tdir) / "ckpt",
            config=tc,
            model_config=model,
            seed=recipe.seed,
            progress=progress is not None,
        )
        return export_checkpoints(
            ckpt,
            out,
            num_members=recipe.num_members,
            num_samples=recipe.num_samples,
            seed=recipe.seed,
            name=recipe.name or recipe.combination,  # not the folder: users copy bundles around
            classes=recipe.classes,
            tile_size=recipe.tile_size,
            calibrate=calibrate,
            overwrite=overwrite,
            progress=progress,
        )


# --------------------------------------------------------------------------- calibration


def run_members(
    bundle: Bundle, images: npt.NDArray[np.float32], *, seed: int | None = None, batch: int = 8
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Run every member on normalised ``images [N,C,H,W]``.

    Returns ``means [M, N, K, H, W]`` and ``sample_entropy [M, N, H, W]``.
    """
    man = bundle.manifest
    n, _, h, w = images.shape
    seeds = np.full(n, man.seed if seed is None else seed, dtype=np.int64)
    offsets = np.stack([np.arange(n), np.zeros(n), np.zeros(n)], axis=1).astype(np.int64)
    valid = np.tile(np.array([[h, w]], dtype=np.int64), (n, 1))
    means, ents = [], []
    for i in range(man.num_members):
        sess = _session(bundle.member_path(i))
        mm, ee = [], []
        for a in range(0, n, batch):
            sl = slice(a, a + batch)
            feeds = {
                "image": images[sl],
                "seed": seeds[sl],
                "offset": offsets[sl],
                "valid": valid[sl],
            }
            mean, ent = sess.run(["mean", "sample_entropy"], feeds)
            mm.append(mean)
            ee.append(ent)
        means.append(np.concatenate(mm))
        ents.append(np.concatenate(ee))
    return np.stack(means), np.stack(ents)


def _normalise(images: npt.NDArray[np.float32], norm: Normalization) -> npt.NDArray[np.float32]:
    """``[N, C, H, W]`` raw images -> graph inputs; z-score is measured per image."""
    out = np.empty_like(images, dtype=np.float32)
    for i, img in enumerate(images):
        shift, scale = norm.shift_scale(img)
        x = img if norm.clip is None else np.clip(img, *norm.clip)
        out[i] = (x - shift) * scale
    return out


CALIBRATION_SHIFTS = PAPER_SHIFTS


def calibrate_bundle(
    bundle: Bundle,
    *,
    num_id: int = 24,
    num_per_shift: int = 6,
    severity: float = 0.7,
    seed: int = 12345,
) -> Manifest:
    """Choose the default aggregator and the OOD threshold on synthetic validation data.

    ID validation slices come from :func:`uqserve.data.make_dataset` (seeds unseen
    in training), OOD slices are the same kind of slices under the paper's four
    corruptions (:func:`uqserve.data.apply_shift`). The default aggregator is the
    one whose image-level EU separates ID from OOD best (AUROC); the threshold is
    the 0.95 quantile of the ID scores. Returns the updated manifest.
    """
    from uqserve import data, uncertainty

    man = bundle.manifest
    cal = int(man.extra.get("calibration_size") or 0)
    mult = man.input.multiple
    size = (cal - cal % mult, cal - cal % mult) if cal >= mult else man.input.tile_size
    ds = data.make_dataset(
        num_id + num_per_shift * len(CALIBRATION_SHIFTS),
        seed=seed,
        size=size,
        num_classes=man.num_classes,
    )
    raw = np.asarray(ds.images, dtype=np.float32)
    id_raw = raw[:num_id]
    ood_raw = np.stack(
        [
            data.apply_shift(raw[num_id + j], kind, severity, seed + j, volume=False)
            for j, kind in enumerate(s for s in CALIBRATION_SHIFTS for _ in range(num_per_shift))
        ]
    ).astype(np.float32)
    norm = man.input.normalization
    images = _normalise(np.concatenate([id_raw, ood_raw]), norm)
    means, ents = run_members(bundle, images)
    thresholds: dict[str, float] = {}
    decs = []
    for i in range(images.shape[0]):
        acc = uncertainty.Accumulator(man.num_classes, images.shape[2:])
        for m in range(man.num_members):
            acc.add(means[m, i], ents[m, i])
        decs.append(acc.result())
    # The `threshold` aggregator needs a cut-off per map; predict scores all five.
    for key in ("tu", "au", "eu", "au_sample", "au_latent"):
        pooled = np.concatenate([getattr(d, key).ravel() for d in decs[:num_id]])
        thresholds[key] = float(np.quantile(pooled, 0.95))
    scores: dict[str, list[float]] = {}
    for agg in AGGREGATORS:
        scores[agg] = [
            float(
                uncertainty.image_score(
                    d.eu,
                    agg,
                    seg=np.argmax(d.mean, axis=0),
                    member_foreground=d.member_foreground,
                    threshold=thresholds["eu"],
                )
            )
            for d in decs
        ]
    aurocs = {agg: _auroc(v[:num_id], v[num_id:]) for agg, v in scores.items()}
    # Ties (e.g. M = 1, where EU is 0) keep the paper's aggregator, `border`.
    best = max(AGGREGATORS, key=lambda a: (round(aurocs[a], 6), a == "border"))
    id_scores = scores[best][:num_id]
    tau = float(uncertainty.calibrate_ood_threshold(id_scores, quantile=0.95))
    truth = np.asarray(ds.annotations)[:num_id]
    validation = dict(man.validation)
    validation.update(
        {
            "num_id": num_id,
            "num_ood": len(images) - num_id,
            "shifts": list(CALIBRATION_SHIFTS),
            "severity": severity,
            "auroc_eu": {a: round(v, 4) for a, v in aurocs.items()},
            "thresholds": thresholds,
            "dice_id": round(_dice(np.argmax(means[:, :num_id].mean(0), axis=1), truth), 4),
        }
    )
    return replace(
        man,
        default_aggregator=best,
        ood=OODSpec(
            aggregator=best,
            threshold=tau,
            quantile=0.95,
            validation_scores=tuple(round(s, 6) for s in id_scores),
        ),
        validation=validation,
    )


def _auroc(scores_in: Sequence[float], scores_out: Sequence[float]) -> float:
    """P(score_out > score_in) + 0.5 P(tie): AUROC of OOD vs ID."""
    a = np.asarray(scores_in, dtype=np.float64)[:, None]
    b = np.asarray(scores_out, dtype=np.float64)[None, :]
    return float((b > a).mean() + 0.5 * (b == a).mean())


def _dice(seg: npt.NDArray[Any], annotations: npt.NDArray[Any]) -> float:
    """Mean foreground Dice of ``seg [N,H,W]`` against every annotator ``[N,A,H,W]``."""
    p = (seg > 0)[:, None]
    t = annotations > 0
    inter = (p & t).sum(axis=(2, 3))
    tot = p.sum(axis=(2, 3)) + t.sum(axis=(2, 3))
    d = np.where(tot > 0, 2 * inter / np.maximum(tot, 1), 1.0)
    return float(d.mean())


# --------------------------------------------------------------------------- your own ONNX


def export_onnx_members(
    onnx_files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    au: str = "softmax",
    outputs: str = "logits",
    classes: Sequence[str] = default_class_names(2),
    normalization: Normalization | None = None,
    tile_size: tuple[int, int] = (128, 128),
    multiple: int = 16,
    name: str | None = None,
    seed: int = 0,
    calibrate: bool = True,
    overwrite: bool = False,
) -> Bundle:
    """Wrap your own ONNX graphs (``[B,C,H,W] -> [B,K,H,W]``) into a bundle.

    Each graph becomes one member (two or more: a softmax ensemble, e.g. five
    nnU-Net folds; one: ``eu = none``). ``outputs`` says whether the graph
    returns ``logits`` (softmax is added) or ``probs``. The wrapper adds the
    contract's outputs (mean, entropy, per-sample counts in the valid region,
    labels) and the unused ``seed``/``offset`` inputs with the onnx API.
    """
    if au != "softmax":
        raise ExportError(f"--au {au}: only softmax members can be brought as plain ONNX graphs")
    if outputs not in ("logits", "probs"):
        raise ExportError(f"--outputs {outputs}: choose logits or probs")
    if not onnx_files:
        raise ExportError("no ONNX files given; pass one file per member")
    classes = tuple(classes)
    if len(classes) < 2:
        raise ExportError(f"--classes {','.join(classes)}: need at least two (background first)")
    wrapped = [wrap_onnx_member(f, num_classes=len(classes), outputs=outputs) for f in onnx_files]
    channels = {c for _, c, _ in wrapped}
    if len(channels) != 1:
        raise ExportError(
            f"the members take different channel counts {sorted(channels)}; they must agree"
        )
    opsets = {o for _, _, o in wrapped}
    plan = ExportPlan(
        name=name or Path(out_dir).name,
        au="softmax",
        eu="ensemble" if len(wrapped) > 1 else "none",
        num_members=len(wrapped),
        num_samples=1,
        classes=classes,
        input=InputSpec(
            channels=channels.pop(),
            tile_size=tile_size,
            multiple=multiple,
            normalization=normalization or Normalization(),
        ),
        seed=seed,
        extra={"source": "onnx", "outputs": outputs, "files": [Path(f).name for f in onnx_files]},
    )
    import onnx

    with atomic_bundle_dir(out_dir, overwrite) as tmp:
        files = []
        for m, (model, _, _) in enumerate(wrapped):
            f = f"member_{m}.onnx"
            onnx.save(model, str(tmp / f))
            files.append(f)
        manifest = _manifest(plan, _members(tmp, files), max(opsets))
        write_manifest(tmp, manifest)
        if calibrate:
            write_manifest(tmp, calibrate_bundle(Bundle(tmp, manifest)))
        load_bundle(tmp, verify=True)
    return load_bundle(out_dir, verify=True)


def wrap_onnx_member(
    path: str | os.PathLike[str], *, num_classes: int, outputs: str = "logits"
) -> tuple[onnx.ModelProto, int, int]:
    """Wrap one user graph into the member contract; returns ``(model, channels, opset)``."""
    import onnx
    from onnx import TensorProto, helper

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        user = onnx.load(str(path))
        onnx.checker.check_model(user)
    except Exception as exc:
        raise ExportError(
            f"{path}: not a valid ONNX model ({type(exc).__name__}); pass an .onnx file"
        ) from exc
    g = user.graph
    inits = {i.name for i in g.initializer}
    ins = [vi for vi in g.input if vi.name not in inits]
    if len(ins) != 1 or len(g.output) != 1:
        raise ExportError(
            f"{path}: needs exactly one input [B,C,H,W] and one output [B,K,H,W], "
            f"has inputs {[vi.name for vi in ins]} and outputs {[vi.name for vi in g.output]}"
        )
    vin, vout = ins[0], g.output[0]

    def dims(vi: onnx.ValueInfoProto) -> list[int | str]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim
        ]

    din, dout = dims(vin), dims(vout)
    if (
        vin.type.tensor_type.elem_type != TensorProto.FLOAT
        or len(din) != 4
        or not isinstance(din[1], int)
    ):
        raise ExportError(
            f"{path}: input {vin.name!r} must be float32 [B, C, H, W] with fixed C, got {din}"
        )
    if vout.type.tensor_type.elem_type != TensorProto.FLOAT or len(dout) != 4:
        raise ExportError(f"{path}: output {vout.name!r} must be float32 [B, K, H, W], got {dout}")
    if isinstance(dout[1], int) and dout[1] != num_classes:
        raise ExportError(
            f"{path}: the graph outputs {dout[1]} classes but {num_classes} class names were given"
        )
    opset = next((o.version for o in user.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ExportError(f"{path}: opset {opset} is too old; re-export it at opset 13 or newer")
    channels = int(din[1])
    # Rename everything of the user's graph so our node names cannot clash.
    user = onnx.compose.add_prefix(user, "user_")
    g = user.graph
    src_in, src_out = (
        g.input[[vi.name for vi in g.input].index("user_" + vin.name)].name,
        g.output[0].name,
    )
    nodes = [helper.make_node("Identity", ["image"], [src_in], name="wrap_image")]
    nodes += list(g.node)
    k = num_classes
    c = helper.make_tensor
    consts = [
        c("wrap_axes_k", TensorProto.INT64, [1], [1]),
        c("wrap_axes_hw", TensorProto.INT64, [2], [2, 3]),
        c("wrap_tiny", TensorProto.FLOAT, [], [1e-30]),
        c("wrap_zero", TensorProto.INT64, [], [0]),
        c("wrap_one", TensorProto.INT64, [], [1]),
        c("wrap_classes", TensorProto.INT64, [1, k, 1, 1], list(range(k))),
        c("wrap_i0", TensorProto.INT64, [1], [0]),
        c("wrap_i1", TensorProto.INT64, [1], [1]),
        c("wrap_i2", TensorProto.INT64, [1], [2]),
        c("wrap_i3", TensorProto.INT64, [1], [3]),
        c("wrap_shape_b11", TensorProto.INT64, [3], [-1, 1, 1]),
        c("wrap_shape_1h1", TensorProto.INT64, [3], [1, -1, 1]),
        c("wrap_shape_11w", TensorProto.INT64, [3], [1, 1, -1]),
    ]
    mk = helper.make_node
    if outputs == "logits":
        nodes.append(mk("Softmax", [src_out], ["mean"], axis=1))
    else:
        nodes.append(mk("Identity", [src_out], ["mean"]))
    nodes += [
        # sample_entropy = -sum_k p ln p with 0 ln 0 = 0 (clamp only inside the log)
        mk("Max", ["mean", "wrap_tiny"], ["wrap_pc"]),
        mk("Log", ["wrap_pc"], ["wrap_logp"]),
        mk("Mul", ["mean", "wrap_logp"], ["wrap_plogp"]),
        mk("ReduceSum", ["wrap_plogp", "wrap_axes_k"], ["wrap_negent"], keepdims=0),
        mk("Neg", ["wrap_negent"], ["sample_entropy"]),
        # labels [B,1,H,W]
        mk("ArgMax", ["mean"], ["wrap_labels"], axis=1, keepdims=1),
        mk("Cast", ["wrap_labels"], ["sample_labels"], to=TensorProto.UINT8),
        # valid-region mask [B,1,H,W]
        mk("Shape", ["mean"], ["wrap_shape"]),
        mk("Gather", ["wrap_shape", "wrap_i2"], ["wrap_h1"]),
        mk("Gather", ["wrap_shape", "wrap_i3"], ["wrap_w1"]),
        mk("Squeeze", ["wrap_h1"], ["wrap_h"]),
        mk("Squeeze", ["wrap_w1"], ["wrap_w"]),
        mk("Range", ["wrap_zero", "wrap_h", "wrap_one"], ["wrap_rows"]),
        mk("Range", ["wrap_zero", "wrap_w", "wrap_one"], ["wrap_cols"]),
        mk("Reshape", ["wrap_rows", "wrap_shape_1h1"], ["wrap_rows3"]),
        mk("Reshape", ["wrap_cols", "wrap_shape_11w"], ["wrap_cols3"]),
        mk("Gather", ["valid", "wrap_i0"], ["wrap_vr"], axis=1),
        mk("Gather", ["valid", "wrap_i1"], ["wrap_vc"], axis=1),
        mk("Reshape", ["wrap_vr", "wrap_shape_b11"], ["wrap_vr3"]),
        mk("Reshape", ["wrap_vc", "wrap_shape_b11"], ["wrap_vc3"]),
        mk("Less", ["wrap_rows3", "wrap_vr3"], ["wrap_inr"]),
        mk("Less", ["wrap_cols3", "wrap_vc3"], ["wrap_inc"]),
        mk("And", ["wrap_inr", "wrap_inc"], ["wrap_in"]),
        mk("Unsqueeze", ["wrap_in", "wrap_axes_k"], ["wrap_in4"]),
        # counts [B,1,K] = sum over valid pixels of one-hot(labels)
        mk("Equal", ["wrap_labels", "wrap_classes"], ["wrap_onehot"]),
        mk("And", ["wrap_onehot", "wrap_in4"], ["wrap_onehot_in"]),
        mk("Cast", ["wrap_onehot_in"], ["wrap_onehot_f"], to=TensorProto.FLOAT),
        mk("ReduceSum", ["wrap_onehot_f", "wrap_axes_hw"], ["wrap_counts"], keepdims=0),
        mk("Unsqueeze", ["wrap_counts", "wrap_axes_k"], ["sample_counts"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"uqserve_member_{path.stem}",
        inputs=[
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", channels, "H", "W"]),
            helper.make_tensor_value_info("seed", TensorProto.INT64, ["B"]),
            helper.make_tensor_value_info("offset", TensorProto.INT64, ["B", 3]),
            helper.make_tensor_value_info("valid", TensorProto.INT64, ["B", 2]),
        ],
        outputs=[
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["B", k, "H", "W"]),
            helper.make_tensor_value_info("sample_entropy", TensorProto.FLOAT, ["B", "H", "W"]),
            helper.make_tensor_value_info("sample_counts", TensorProto.FLOAT, ["B", 1, k]),
            helper.make_tensor_value_info("sample_labels", TensorProto.UINT8, ["B", 1, "H", "W"]),
        ],
        initializer=list(g.initializer) + consts,
    )
    graph.value_info.extend(g.value_info)
    model = helper.make_model(
        graph,
        opset_imports=list(user.opset_import),
        producer_name="uqserve",
        producer_version=__version__,
    )
    model.ir_version = user.ir_version
    if user.functions:
        model.functions.extend(user.functions)
    try:
        onnx.checker.check_model(model)
        _session(model.SerializeToString())
    except Exception as exc:
        raise ExportError(
            f"{path}: the wrapped graph does not load ({exc}); check its input/output shapes"
        ) from exc
    return model, channels, opset


__all__ = [
    "ExportError",
    "ExportPlan",
    "Recipe",
    "atomic_bundle_dir",
    "calibrate_bundle",
    "check_parity",
    "conform_signature",
    "export_checkpoints",
    "export_member",
    "export_networks",
    "export_onnx_members",
    "export_recipe",
    "load_recipe",
    "parity_feeds",
    "run_members",
    "wrap_onnx_member",
]
