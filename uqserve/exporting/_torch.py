"""Export trained PyTorch networks to ONNX member graphs and check them against PyTorch.

Every member graph is run through the :class:`~uqserve.runtime.Runtime`
interface (embedded onnxruntime, CPU) and compared with PyTorch under
identical noise before the bundle is written: mean and sample entropy within
:data:`PARITY_ATOL`, sample labels equal except at near-ties.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Bundle, load_bundle
from uqserve.contracts import MEMBER_INPUTS, MEMBER_OUTPUTS, member_specs
from uqserve.exporting._onnx import conform_signature
from uqserve.exporting._plan import OPSET, ExportError, ExportPlan
from uqserve.exporting._writer import Calibrator, Say, atomic_bundle_dir, finish_bundle
from uqserve.models.config import ModelConfig
from uqserve.runtime import Batch, Runtime

if TYPE_CHECKING:
    from torch import nn

PARITY_ATOL = 1e-4
EXPORTERS = ("torchscript", "dynamo")
# Dynamic dimensions of the member signature (the rest are fixed per bundle).
_DYNAMIC = ("B", "D", "H", "W")


def _dynamic_axes(names: Sequence[str], spec: dict[str, Any]) -> dict[str, dict[int, str]]:
    return {n: {i: d for i, d in enumerate(spec[n][1]) if d in _DYNAMIC} for n in names}


def export_member(
    graph: nn.Module,
    path: str | os.PathLike[str],
    *,
    in_channels: int,
    num_classes: int,
    num_samples: int,
    example_size: tuple[int, ...] = (32, 32),
    exporter: str = "torchscript",
) -> Path:
    """Export one :class:`~uqserve.models.member.MemberGraph` to ONNX (opset 18).

    ``exporter="torchscript"`` (default: 0.5 s per member on 2 cores) or
    ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, about 15 s per member).
    B and the spatial sizes are dynamic; all four inputs are present even where a
    method ignores one (softmax ignores ``seed`` and ``offset``). ``example_size``
    has 2 sizes ``(H, W)`` for a slice network, 3 ``(D, H, W)`` for a volumetric one.
    """
    import onnx
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    path = Path(path)
    dims = len(example_size)
    spec_in, spec_out = member_specs(dims)
    args = (
        torch.zeros(2, in_channels, *example_size),
        torch.tensor([0, 1], dtype=torch.int64),
        torch.zeros(2, 3, dtype=torch.int64),
        torch.tensor([list(example_size)] * 2, dtype=torch.int64),
    )
    graph = graph.eval()
    common: dict[str, Any] = {
        "opset_version": OPSET,
        "input_names": list(MEMBER_INPUTS),
        "output_names": list(MEMBER_OUTPUTS),
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {
                **_dynamic_axes(MEMBER_INPUTS, spec_in),
                **_dynamic_axes(MEMBER_OUTPUTS, spec_out),
            }
            torch.onnx.export(graph, args, str(path), dynamo=False, dynamic_axes=axes, **common)
        else:
            dyn = torch.export.Dim.DYNAMIC
            shapes = {
                n: {i: dyn for i in axes}
                for n, axes in _dynamic_axes(MEMBER_INPUTS, spec_in).items()
            }
            prog = torch.onnx.export(
                graph, args, None, dynamo=True, external_data=False, dynamic_shapes=shapes, **common
            )
            if prog is None:
                raise ExportError("dynamo export returned no program")
            prog.save(str(path), external_data=False)
    model = onnx.load(str(path))
    conform_signature(model, in_channels, num_classes, num_samples, dims)
    onnx.save(model, str(path))
    return path


def parity_feeds(
    channels: int, size: tuple[int, ...], batch: int = 2, seed: int = 0
) -> dict[str, npt.NDArray[Any]]:
    """Random member-graph inputs: images, seeds, tile offsets and a partly padded tile.

    ``size``: ``(H, W)`` slices or ``(D, H, W)`` volumes.
    """
    rng = np.random.default_rng(seed)
    valid = np.tile(np.array([list(size)], dtype=np.int64), (batch, 1))
    cuts = (5, 3) if len(size) == 2 else (2, 5, 3)
    valid[-1] = [max(1, n - cut) for n, cut in zip(size, cuts, strict=True)]
    return {
        "image": rng.normal(size=(batch, channels, *size)).astype(np.float32),
        "seed": rng.integers(0, 2**40, size=batch, dtype=np.int64),
        "offset": np.stack(
            [np.arange(batch), rng.integers(0, 512, batch), rng.integers(0, 512, batch)], axis=1
        ).astype(np.int64),
        "valid": valid,
    }


def check_parity(
    graphs: Sequence[nn.Module],
    runtime: Runtime,
    feeds: dict[str, npt.NDArray[Any]],
    atol: float = PARITY_ATOL,
) -> list[float]:
    """Compare every member as ``runtime`` runs it with its PyTorch graph on ``feeds``.

    Returns the max abs difference of ``mean`` and ``sample_entropy`` per
    member; raises :class:`ExportError` if one exceeds ``atol`` or if labels
    differ anywhere the PyTorch probabilities are not a near-tie.
    """
    import torch

    outs = runtime.infer(Batch(**feeds), want_samples=True)
    diffs = []
    for m, (graph, out) in enumerate(zip(graphs, outs, strict=True)):
        path = runtime.bundle.member_path(m).name
        with torch.no_grad():
            ref = [t.numpy() for t in graph(*(torch.from_numpy(feeds[n]) for n in MEMBER_INPUTS))]
        diff = max(
            float(np.abs(a - b).max())
            for a, b in zip((out.mean, out.sample_entropy), ref[:2], strict=True)
        )
        if not np.isfinite(diff) or diff > atol:
            raise ExportError(
                f"{path}: ONNX and PyTorch outputs differ by {diff:.3g} (> {atol:g}); "
                "the export is wrong: report it with the model config"
            )
        assert out.sample_labels is not None  # want_samples=True
        labels_differ = int((out.sample_labels != ref[3]).sum())
        counts_diff = float(np.abs(out.sample_counts - ref[2]).sum())
        if counts_diff > 2 * labels_differ or labels_differ > 0.001 * ref[3].size + 2:
            raise ExportError(
                f"{path}: ONNX and PyTorch sample labels differ at {labels_differ} voxels; "
                "the export is wrong: report it with the model config"
            )
        diffs.append(diff)
    return diffs


def with_member_key(src: Path, dst: Path, member: int) -> Path:
    """Write member graph ``src`` as member ``member``: only its ``MEMBER_KEY`` changes.

    For members that share their weights and differ only in the index their noise
    is keyed by (fresh-mask MC dropout); the parity check then tests each one.
    """
    import onnx
    from onnx import numpy_helper

    from uqserve.models.member import MEMBER_KEY

    model = onnx.load(str(src))
    keys = [i for i in model.graph.initializer if i.name == MEMBER_KEY]
    if len(keys) != 1:
        raise ExportError(f"{src}: no single {MEMBER_KEY!r} initializer; export each member")
    keys[0].CopyFrom(numpy_helper.from_array(np.array(member, dtype=np.int64), MEMBER_KEY))
    onnx.save(model, str(dst))
    return dst


#: EU methods exported from one network per member (SWAG: one per weight draw).
NET_PER_MEMBER = ("ensemble", "swag", "swagdiag")


def _check_nets(plan: ExportPlan, n: int) -> None:
    if plan.eu in NET_PER_MEMBER and n != plan.num_members:
        raise ExportError(
            f"{plan.eu} of {plan.num_members} members needs {plan.num_members} networks, got {n}"
        )
    if plan.eu not in NET_PER_MEMBER and n != 1:
        raise ExportError(f"eu {plan.eu!r} exports one trained network, got {n}")
    if plan.eu == "none" and plan.num_members != 1:
        raise ExportError("eu 'none' has exactly one member")


def export_networks(
    nets: Sequence[nn.Module],
    out_dir: str | os.PathLike[str],
    plan: ExportPlan,
    model_config: ModelConfig,
    *,
    overwrite: bool = False,
    calibrate: Calibrator | None = None,
    exporter: str = "torchscript",
    progress: Say | None = None,
) -> Bundle:
    """Export trained networks as one bundle (parity-checked, atomic, calibrated by ``calibrate``).

    ``nets`` holds one network per member for ``ensemble`` and ``swag``/``swagdiag``
    (the weight draws), exactly one for ``none`` and ``mcdropout`` (whose M
    members are the frozen dropout masks). ``calibrate`` (e.g.
    ``uqserve.calibration.calibrate_bundle``) runs on the checked bundle; ``None``
    leaves it uncalibrated.
    """
    from uqserve.models import member_graph
    from uqserve.runtime.embedded import EmbeddedRuntime

    say = progress or (lambda _msg: None)
    _check_nets(plan, len(nets))
    mult = model_config.multiple
    side = max(32, mult * ((32 + mult - 1) // mult))
    # Volumes: a smaller example keeps the 3D parity check quick on a CPU.
    size = (side, side) if model_config.dims == 2 else (max(8, mult), max(16, mult), side)
    graphs = [
        member_graph(nets[m] if plan.eu in NET_PER_MEMBER else nets[0], m, plan.num_samples,
                     eu=plan.eu, seed=plan.seed)
        for m in range(plan.num_members)
    ]  # fmt: skip

    def parity(bundle: Bundle) -> None:
        feeds = parity_feeds(model_config.in_channels, size)
        with EmbeddedRuntime(bundle, device="cpu", threads=1, workers=1) as rt:
            for m, diff in enumerate(check_parity(graphs, rt, feeds)):
                say(f"member {m}: exported, parity max |diff| {diff:.2g}")

    # Fresh-mask MC dropout: the members differ only in their index, so one export.
    one_graph = plan.eu == "mcdropout" and model_config.mc_dropout_masks == "fresh"
    with atomic_bundle_dir(out_dir, overwrite) as tmp:
        files = [f"member_{m}.onnx" for m in range(plan.num_members)]
        for m, (graph, f) in enumerate(zip(graphs, files, strict=True)):
            if one_graph and m > 0:
                with_member_key(tmp / files[0], tmp / f, m)
                continue
            export_member(
                graph,
                tmp / f,
                in_channels=model_config.in_channels,
                num_classes=model_config.num_classes,
                num_samples=plan.num_samples,
                example_size=size,
                exporter=exporter,
            )
        finish_bundle(tmp, plan, files, OPSET, calibrate=calibrate, check=parity, say=say)
    return load_bundle(out_dir, verify=True)
