"""ONNX graph editing: the member signature, and your own ONNX graphs as members.

:func:`conform_signature` makes an exported graph's inputs and outputs exactly
the member contract of :mod:`uqserve.contracts`. :func:`wrap_onnx_member`
turns a plain ``[B,C,H,W] -> [B,K,H,W]`` graph (e.g. one nnU-Net fold) into a
member with the onnx API (no torch needed); :func:`export_onnx_members`
writes such graphs as a softmax bundle.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uqserve._version import __version__
from uqserve.bundle import Bundle, BundleError, InputSpec, Normalization, Padding, load_bundle
from uqserve.contracts import TensorSpec, default_class_names, member_specs
from uqserve.exporting._plan import ExportError, ExportPlan, bundle_name, refuse_repeated_members
from uqserve.exporting._writer import Calibrator, atomic_bundle_dir, finish_bundle

if TYPE_CHECKING:
    import onnx

_ONNX_TYPES = {"float32": 1, "uint8": 2, "int64": 7}  # onnx.TensorProto's enum values


def _value_info(name: str, spec: TensorSpec, sizes: dict[str, int]) -> onnx.ValueInfoProto:
    """The contract's ``spec`` with the fixed sizes (``C``, ``K``, ``S``) filled in."""
    from onnx import helper

    dtype, dims = spec
    shape = [sizes.get(d, d) if isinstance(d, str) else d for d in dims]
    return helper.make_tensor_value_info(name, _ONNX_TYPES[dtype], shape)


def member_value_infos(
    channels: int, num_classes: int, num_samples: int, dims: int = 2
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The member signature's inputs and outputs as ONNX value infos, in order."""
    sizes = {"C": channels, "K": num_classes, "S": num_samples}
    specs_in, specs_out = member_specs(dims)
    return (
        [_value_info(n, s, sizes) for n, s in specs_in.items()],
        [_value_info(n, s, sizes) for n, s in specs_out.items()],
    )


def conform_signature(
    model: onnx.ModelProto, channels: int, num_classes: int, num_samples: int, dims: int = 2
) -> None:
    """Make ``model``'s inputs and outputs exactly the member contract (in place).

    Adds any of ``image, seed, offset, valid`` the exporter dropped, orders the
    inputs, and writes readable dimension names ``B, (D,) H, W`` and the fixed sizes.
    """
    want_in, want_out = member_value_infos(channels, num_classes, num_samples, dims)
    g = model.graph
    inits = {i.name for i in g.initializer}
    names_in = {vi.name for vi in want_in}
    extra = [vi.name for vi in g.input if vi.name not in names_in and vi.name not in inits]
    if extra:
        raise ExportError(f"graph has unexpected inputs {extra}")
    missing = [vi.name for vi in want_out if vi.name not in {o.name for o in g.output}]
    if missing:
        raise ExportError(f"graph lacks outputs {missing}")
    keep_inits = [vi for vi in g.input if vi.name in inits]
    del g.input[:]
    g.input.extend(want_in + keep_inits)
    del g.output[:]
    g.output.extend(want_out)


def export_onnx_members(
    onnx_files: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    au: str = "softmax",
    outputs: str = "logits",
    classes: Sequence[str] | None = None,
    normalization: Normalization | None = None,
    tile_size: tuple[int, int] = (128, 128),
    multiple: int = 16,
    dims: int = 2,
    patch: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
    interpolation: str = "cubic",
    pad: Padding | None = None,
    name: str | None = None,
    seed: int = 0,
    calibrate: Calibrator | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Wrap your own ONNX graphs (``[B,C,H,W] -> [B,K,H,W]``) into a bundle.

    The geometry the graphs were trained in goes into the manifest: ``dims``
    (2, or 3 for ``[B,C,D,H,W]`` graphs), ``patch`` (the window, ``dims``
    sizes; required for 3D), ``spacing`` (mm per model axis, ``[D, H, W]`` =
    ``z, y, x`` for 3D), ``orientation`` (axis codes, e.g. ``"RAS"``) and the
    image ``interpolation``; ``pad``: how a scan smaller than the window is
    padded (default: reflection; nnU-Net's: ``Padding("constant", 0.0, True)``).
    Graphs returning ``logits`` have their windows blended in logit space
    (``input.blend``). ``calibrate`` (e.g.
    ``uqserve.calibration.calibrate_bundle``) draws synthetic 2D slices, so 3D
    bundles are exported without (``None``) and calibrated on whole scans
    afterwards (``uqserve calibrate BUNDLE --data DIR``).

    ``classes`` default to ``uqserve.contracts.default_class_names(2)``.
    Each graph becomes one member (two or more: a softmax ensemble, e.g. five
    nnU-Net folds; one: ``eu = none``). ``outputs`` says whether the graph
    returns ``logits`` (softmax is added) or ``probs``. The wrapper adds the
    contract's outputs (mean, entropy, per-sample counts in the valid region,
    labels) and the unused ``seed``/``offset`` inputs with the onnx API.
    """
    name = bundle_name(name, out_dir)
    if au != "softmax":
        raise ExportError(f"`au={au}`: only softmax members can be brought as plain ONNX graphs")
    if outputs not in ("logits", "probs"):
        raise ExportError(f"`outputs={outputs}`: choose logits or probs")
    if not onnx_files:
        raise ExportError("no ONNX files given; pass one file per member")
    classes = tuple(classes) if classes is not None else default_class_names(2)
    if len(classes) < 2:
        raise ExportError(f"`classes={','.join(classes)}`: need at least two (background first)")
    if dims == 3 and calibrate:
        raise ExportError(
            "`calibrate`: export-time calibration draws synthetic 2D slices; export 3D "
            "members with `calibrate=None`, then calibrate on your own scans "
            "(uqserve.calibration.calibrate with a data folder)"
        )
    geometry = InputSpec(
        tile_size=tile_size, multiple=multiple, dims=dims,
        patch=None if patch is None else tuple(int(v) for v in patch),
        spacing=None if spacing is None else tuple(float(v) for v in spacing),
        orientation=None if orientation is None else orientation.upper(),
        interpolation=interpolation, normalization=normalization or Normalization(),
        pad=pad or Padding(),
        # logits: windows are blended in logit space (probabilities: as given)
        blend="logits" if outputs == "logits" else "probabilities",
    )  # fmt: skip
    if problems := geometry.problems():
        raise ExportError("; ".join(problems))
    wrapped = [
        wrap_onnx_member(f, num_classes=len(classes), outputs=outputs, dims=dims)
        for f in onnx_files
    ]
    refuse_repeated_members(
        [(str(f), _graph_sha256(m)) for f, (m, _, _) in zip(onnx_files, wrapped, strict=True)]
    )
    channels = {c for _, c, _ in wrapped}
    if len(channels) != 1:
        raise ExportError(
            f"the members take different channel counts {sorted(channels)}; they must agree"
        )
    opsets = {o for _, _, o in wrapped}
    plan = ExportPlan(
        name=name,
        au="softmax",
        eu="ensemble" if len(wrapped) > 1 else "none",
        num_members=len(wrapped),
        num_samples=1,
        classes=classes,
        input=dataclasses.replace(geometry, channels=channels.pop()),
        seed=seed,
        extra={"source": "onnx", "outputs": outputs, "files": [Path(f).name for f in onnx_files]},
    )
    import onnx

    with atomic_bundle_dir(out_dir, overwrite) as tmp:
        files = [f"member_{m}.onnx" for m in range(len(wrapped))]
        for (model, _, _), f in zip(wrapped, files, strict=True):
            onnx.save(model, str(tmp / f))
        check = functools.partial(_smoke_run, sources=[Path(f) for f in onnx_files])
        finish_bundle(tmp, plan, files, max(opsets), calibrate=calibrate, check=check)
    return load_bundle(out_dir, verify=True)


def _graph_sha256(model: onnx.ModelProto) -> str:
    """sha256 of a graph's weights and nodes, whatever its name (the file's stem)."""
    import hashlib

    import onnx

    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.name, graph.doc_string = "", ""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


def _smoke_run(bundle: Bundle, sources: Sequence[Path]) -> None:
    """Load and run the wrapped members once through the runtime interface."""
    import numpy as np

    from uqserve.runtime import Batch
    from uqserve.runtime.embedded import EmbeddedRuntime

    man = bundle.manifest
    h = w = max(man.input.multiple, 8)
    sp = (h, w) if man.input.patch is None else tuple(man.input.patch)
    # A normalised image (not zeros): graphs that fail on real intensities show it here.
    rng = np.random.default_rng(0)
    batch = Batch(
        image=rng.normal(size=(1, man.input.channels, *sp)).astype(np.float32),
        seed=np.zeros(1, np.int64),
        offset=np.zeros((1, 3), np.int64),
        valid=np.array([sp], np.int64),
    )
    try:
        with EmbeddedRuntime(bundle, device="cpu", threads=1, workers=1) as rt:
            outs = rt.infer(batch)
    except (BundleError, RuntimeError) as exc:  # onnxruntime's run errors are RuntimeErrors
        names = ", ".join(f"member_{m} = {s.name}" for m, s in enumerate(sources))
        raise ExportError(
            f"the wrapped graphs do not run ({exc}; {names}); check their input/output shapes"
        ) from exc
    for source, out in zip(sources, outs, strict=True):
        _check_smoke_output(source, out.mean, (1, man.num_classes, *sp), man.input.channels)


def _check_smoke_output(source: Path, mean: Any, expected: tuple[int, ...], channels: int) -> None:
    """One member's smoke-run output: the declared class count and probabilities."""
    from uqserve.errors import UsageError
    from uqserve.uncertainty import check_probabilities

    if mean.shape != expected:
        raise ExportError(
            f"{source}: outputs {mean.shape[1] if mean.ndim > 1 else '?'} channels "
            f"(shape {list(mean.shape)}) for a [1, {channels}, ...] image, but "
            f"{expected[1]} classes were given; pass --classes with one name per output channel"
        )
    try:
        check_probabilities(mean, 1, "output")
    except UsageError as exc:
        reason = str(exc).split(": ", 1)[-1].split("; ")[0]
        raise ExportError(
            f"{source}: its output {reason} on a test image (after the softmax, if logits); "
            "a member must give finite class probabilities: fix or re-export the graph"
        ) from None


def _read_user_graph(
    path: Path, num_classes: int, dims: int = 2
) -> tuple[onnx.ModelProto, str, int, int]:
    """Load and check a user graph; returns ``(model, input name, channels, opset)``."""
    import onnx
    from onnx import TensorProto

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
    sp = "H, W" if dims == 2 else "D, H, W"
    inits = {i.name for i in g.initializer}
    ins = [vi for vi in g.input if vi.name not in inits]
    if len(ins) != 1 or len(g.output) != 1:
        raise ExportError(
            f"{path}: needs exactly one input [B,C,{sp}] and one output [B,K,{sp}], "
            f"has inputs {[vi.name for vi in ins]} and outputs {[vi.name for vi in g.output]}"
        )
    vin, vout = ins[0], g.output[0]

    def shape(vi: onnx.ValueInfoProto) -> list[int | str]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim
        ]

    din, dout = shape(vin), shape(vout)
    if (
        vin.type.tensor_type.elem_type != TensorProto.FLOAT
        or len(din) != dims + 2
        or not isinstance(din[1], int)
    ):
        raise ExportError(
            f"{path}: input {vin.name!r} must be float32 [B, C, {sp}] with fixed C, got {din}"
            + (" (a 3D graph? pass `dims=3`)" if len(din) == 5 and dims == 2 else "")
        )
    if vout.type.tensor_type.elem_type != TensorProto.FLOAT or len(dout) != dims + 2:
        raise ExportError(f"{path}: output {vout.name!r} must be float32 [B, K, {sp}], got {dout}")
    if isinstance(dout[1], int) and dout[1] != num_classes:
        raise ExportError(
            f"{path}: the graph outputs {dout[1]} classes but {num_classes} class names were given"
        )
    opset = next((o.version for o in user.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ExportError(f"{path}: opset {opset} is too old; re-export it at opset 13 or newer")
    return user, vin.name, int(din[1]), opset


def _contract_nodes(
    src_out: str, k: int, outputs: str, dims: int = 2
) -> tuple[list[Any], list[Any]]:
    """Nodes and constants computing the member outputs from the user's ``[B,K,*sp]``.

    ``dims`` spatial axes (2: ``H, W``; 3: ``D, H, W``); ``valid [B, dims]`` bounds
    the region the per-sample counts are taken over.
    """
    from onnx import TensorProto, helper

    c = helper.make_tensor
    axes = list(range(2, 2 + dims))
    ones = [1] * dims
    consts = [
        c("wrap_axes_k", TensorProto.INT64, [1], [1]),
        c("wrap_axes_sp", TensorProto.INT64, [dims], axes),
        c("wrap_tiny", TensorProto.FLOAT, [], [1e-30]),
        c("wrap_zero", TensorProto.INT64, [], [0]),
        c("wrap_one", TensorProto.INT64, [], [1]),
        c("wrap_classes", TensorProto.INT64, [1, k, *ones], list(range(k))),
        c("wrap_shape_b", TensorProto.INT64, [dims + 1], [-1, *ones]),
    ]
    mk = helper.make_node
    if outputs == "logits":
        nodes = [mk("Softmax", [src_out], ["mean"], axis=1)]
    else:
        nodes = [mk("Identity", [src_out], ["mean"])]
    nodes += [
        # sample_entropy = -sum_k p ln p with 0 ln 0 = 0 (clamp only inside the log)
        mk("Max", ["mean", "wrap_tiny"], ["wrap_pc"]),
        mk("Log", ["wrap_pc"], ["wrap_logp"]),
        mk("Mul", ["mean", "wrap_logp"], ["wrap_plogp"]),
        mk("ReduceSum", ["wrap_plogp", "wrap_axes_k"], ["wrap_negent"], keepdims=0),
        mk("Neg", ["wrap_negent"], ["sample_entropy"]),
        # labels [B,1,*sp]
        mk("ArgMax", ["mean"], ["wrap_labels"], axis=1, keepdims=1),
        mk("Cast", ["wrap_labels"], ["sample_labels"], to=TensorProto.UINT8),
        mk("Shape", ["mean"], ["wrap_shape"]),
    ]
    # valid-region mask [B,*sp]: position < valid along every spatial axis
    inside = ""
    for a in range(dims):
        shape = [1] * (dims + 1)
        shape[a + 1] = -1
        consts += [
            c(f"wrap_i{a}", TensorProto.INT64, [1], [a]),
            c(f"wrap_ax{a}", TensorProto.INT64, [1], [a + 2]),
            c(f"wrap_shape_ax{a}", TensorProto.INT64, [dims + 1], shape),
        ]
        nodes += [
            mk("Gather", ["wrap_shape", f"wrap_ax{a}"], [f"wrap_n{a}1"]),
            mk("Squeeze", [f"wrap_n{a}1"], [f"wrap_n{a}"]),
            mk("Range", ["wrap_zero", f"wrap_n{a}", "wrap_one"], [f"wrap_pos{a}"]),
            mk("Reshape", [f"wrap_pos{a}", f"wrap_shape_ax{a}"], [f"wrap_posr{a}"]),
            mk("Gather", ["valid", f"wrap_i{a}"], [f"wrap_v{a}"], axis=1),
            mk("Reshape", [f"wrap_v{a}", "wrap_shape_b"], [f"wrap_vr{a}"]),
            mk("Less", [f"wrap_posr{a}", f"wrap_vr{a}"], [f"wrap_in{a}"]),
        ]
        if a:
            nodes.append(mk("And", [inside, f"wrap_in{a}"], [f"wrap_inside{a}"]))
            inside = f"wrap_inside{a}"
        else:
            inside = "wrap_in0"
    nodes += [
        mk("Unsqueeze", [inside, "wrap_axes_k"], ["wrap_in_k"]),
        # counts [B,1,K] = sum over valid voxels of one-hot(labels)
        mk("Equal", ["wrap_labels", "wrap_classes"], ["wrap_onehot"]),
        mk("And", ["wrap_onehot", "wrap_in_k"], ["wrap_onehot_in"]),
        mk("Cast", ["wrap_onehot_in"], ["wrap_onehot_f"], to=TensorProto.FLOAT),
        mk("ReduceSum", ["wrap_onehot_f", "wrap_axes_sp"], ["wrap_counts"], keepdims=0),
        mk("Unsqueeze", ["wrap_counts", "wrap_axes_k"], ["sample_counts"]),
    ]
    return nodes, consts


def wrap_onnx_member(
    path: str | os.PathLike[str], *, num_classes: int, outputs: str = "logits", dims: int = 2,
    keep_logits: bool = False,
) -> tuple[onnx.ModelProto, int, int]:  # fmt: skip
    """Wrap one user graph into the member contract; returns ``(model, channels, opset)``.

    ``dims`` 2: ``[B,C,H,W] -> [B,K,H,W]``; 3: ``[B,C,D,H,W] -> [B,K,D,H,W]``.
    ``keep_logits`` (``outputs="logits"``): the graph also returns its logits as
    the optional output ``logits`` (nnU-Net members: blended as nnU-Net does).
    """
    import onnx
    from onnx import helper

    path = Path(path)
    user, input_name, channels, opset = _read_user_graph(path, num_classes, dims)
    # Rename everything of the user's graph so our node names cannot clash.
    user = onnx.compose.add_prefix(user, "user_")
    g = user.graph
    src_in = g.input[[vi.name for vi in g.input].index("user_" + input_name)].name
    nodes, consts = _contract_nodes(g.output[0].name, num_classes, outputs, dims)
    inputs, outs = member_value_infos(channels, num_classes, 1, dims)
    if keep_logits and outputs == "logits":
        nodes.append(helper.make_node("Identity", [g.output[0].name], ["logits"]))
        sp = ["H", "W"] if dims == 2 else ["D", "H", "W"]
        outs = [*outs, helper.make_tensor_value_info("logits", 1, ["B", num_classes, *sp])]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], [src_in], name="wrap_image"), *g.node, *nodes],
        f"uqserve_member_{path.stem}",
        inputs=inputs,
        outputs=outs,
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
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises its own error types
        raise ExportError(
            f"{path}: the wrapped graph is not valid ({exc}); check its input/output shapes"
        ) from exc
    return model, channels, opset
