"""Write and validate Triton model repositories for uqserve bundles.

One bundle becomes M member models, an ensemble named after the bundle and a
lean twin of it without ``sample_labels`` (``<bundle>_nosamples``):

```
<repo>/<bundle>/config.pbtxt                  ensemble: image, seed, offset, valid in;
<repo>/<bundle>/1/.gitkeep                      mean_<m>, sample_entropy_<m>, sample_counts_<m>,
                                                sample_labels_<m> out (m = 0..M-1)
<repo>/<bundle>_nosamples/config.pbtxt        the same without sample_labels_<m> (predict's path)
<repo>/<bundle>_member_<m>/config.pbtxt        one member graph
<repo>/<bundle>_member_<m>/1/model.onnx        the bundle's member file (copy or relative symlink)
<repo>/<bundle>_member_<m>/1/model.py          python flavour only: runs model.onnx (copy or link)
```

With ``reduce="server"`` (``uqserve repo --reduce server``) two more models
sum the members' outputs on the server (``uqserve.serving.reduce``), so that
K + 2 numbers per voxel cross the network instead of M x (K + 1):

```
<repo>/<bundle>_reduce/1/model.onnx           the reduction graph (model.py too, python flavour)
<repo>/<bundle>_reduced/config.pbtxt          ensemble: the members, then the reduction;
                                                mean_sum, entropy_sum, sample_entropy_sum,
                                                foreground, sample_counts out
```

and every ensemble carries the parameter ``uqserve_reduce: server``, which
the Triton runtime reads to use ``<bundle>_reduced`` when it does not need
sample labels.

Two flavours come from the same bundle: ``onnxruntime`` (platform
``onnxruntime_onnx``, GPU instances, for the NGC tritonserver image) and
``python`` (the generic ``model.py`` of ``python_model.py``, CPU instances,
for the pip-installed tritonserver of ``nvidia-pytriton``).

Configs are built as ``model_config_pb2.ModelConfig`` messages (Triton's own
schema, shipped in tritonclient) and written with ``text_format``, so output
is deterministic: no timestamps, no absolute paths. The bundle manifest's
identity (name, version, member sha256) is stored as the ensemble parameter
``uqserve_manifest`` so that clients can check that the served model is the
one they hold.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from uqserve._fs import replace_dir_atomically
from uqserve.bundle import Bundle, BundleError, load_bundle, name_problem, sha256_file
from uqserve.contracts import MEMBER_INPUTS, TensorSpec, member_specs, reduced_outputs
from uqserve.errors import UsageError
from uqserve.triton_names import (
    MANIFEST_PARAMETER,
    NOSAMPLES_SUFFIX,
    REDUCE_PARAMETER,
    manifest_identity,
    member_model_name,
    nosamples_model_name,
    reduce_model_name,
    reduced_model_name,
    served_identity,
)

FLAVOURS = ("python", "onnxruntime")
MEMBER_FILES = ("copy", "symlink")
REDUCE_MODES = ("client", "server")
VERSION = "1"
TEMPLATE = Path(__file__).resolve().parent / "python_model.py"

# onnxruntime's type strings -> Triton's data types.
_ORT_TYPES = {
    "tensor(float)": mc.TYPE_FP32,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(double)": mc.TYPE_FP64,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(int8)": mc.TYPE_INT8,
    "tensor(uint8)": mc.TYPE_UINT8,
    "tensor(bool)": mc.TYPE_BOOL,
}

BundleLike = Bundle | str | os.PathLike[str]


class RepositoryError(UsageError):
    """A repository that cannot be written or does not match its graphs."""


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: int  # mc.DataType
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable
    reshape: tuple[int, ...] | None = None


_MC_TYPES = {
    "float32": mc.TYPE_FP32,
    "int64": mc.TYPE_INT64,
    "uint8": mc.TYPE_UINT8,
    "bool": mc.TYPE_BOOL,
}


def _member_tensors(bundle: Bundle) -> tuple[list[_Tensor], list[_Tensor]]:
    """The member signature (``uqserve.contracts.member_specs``) with this bundle's C, K, S.

    The batch axis ``B`` is Triton's; spatial dims ``H, W`` (slices) or
    ``D, H, W`` (``input.dims`` 3) are variable (-1).
    """
    m = bundle.manifest
    sizes = {"C": m.input.channels, "K": m.num_classes, "S": m.num_samples}

    def tensors(spec: dict[str, TensorSpec]) -> list[_Tensor]:
        found = []
        for name, (dtype, dims) in spec.items():
            shape = tuple(d if isinstance(d, int) else sizes.get(d, -1) for d in dims[1:])
            # Triton wants non-empty dims: a [B] input is [B, 1] on the wire, reshaped to [B].
            reshape = None if shape else ()
            found.append(_Tensor(name, _MC_TYPES[dtype], shape or (1,), reshape=reshape))
        return found

    inputs, outputs = member_specs(m.input.dims)
    return tensors(inputs), tensors(outputs)


def _add_io(
    config: mc.ModelConfig, inputs: Sequence[_Tensor], outputs: Sequence[_Tensor], suffix: str = ""
) -> None:
    for t in inputs:
        i = config.input.add(name=t.name, data_type=t.dtype, dims=list(t.dims))
        if t.reshape is not None:
            i.reshape.shape.extend(t.reshape)
    for t in outputs:
        config.output.add(name=f"{t.name}{suffix}", data_type=t.dtype, dims=list(t.dims))


def _param(config: mc.ModelConfig, key: str, value: object) -> None:
    config.parameters[key].string_value = str(value)


def member_config(
    bundle: Bundle,
    member: int,
    flavour: str,
    *,
    max_batch_size: int,
    instances: int,
    threads: int | None,
    max_queue_delay_us: int,
) -> mc.ModelConfig:
    """The ``ModelConfig`` of one member model."""
    m = bundle.manifest
    config = mc.ModelConfig(name=member_model_name(m.name, member), max_batch_size=max_batch_size)
    inputs, outputs = _member_tensors(bundle)
    _add_io(config, inputs, outputs)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    if flavour == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
        if threads is not None:
            _param(config, "intra_op_thread_count", threads)
            _param(config, "inter_op_thread_count", 1)
    else:
        config.backend = "python"
        config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
        _param(config, "onnx_file", "model.onnx")
        # 0 lets model.py use cores / (instances x members) on the machine it runs on.
        _param(config, "intra_op_threads", threads if threads is not None else 0)
        _param(config, "uqserve_num_members", m.num_members)
    _param(config, "uqserve_member", member)
    _param(config, "uqserve_sha256", m.members[member].sha256)
    return config


def ensemble_config(
    bundle: Bundle,
    *,
    max_batch_size: int,
    max_inflight_requests: int,
    samples: bool = True,
    reduce: str = "client",
) -> mc.ModelConfig:
    """The ensemble that fans the four inputs out to every member.

    With ``samples`` it is the ensemble named after the bundle and returns all
    four outputs of every member; without, it is ``<bundle>_nosamples`` and
    leaves ``sample_labels`` out. Triton's ensembles ask each step for every
    output in its ``output_map`` whatever the client requested, so only an
    ensemble that does not map ``sample_labels`` spares the members from
    computing and shipping ``[B, S, H, W]`` labels.
    """
    m = bundle.manifest
    name = m.name if samples else nosamples_model_name(m.name)
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    inputs, outputs = _member_tensors(bundle)
    if not samples:
        outputs = [t for t in outputs if t.name != "sample_labels"]
    # The ensemble passes [B, 1] seeds through unchanged; members reshape.
    _add_io(config, [_Tensor(t.name, t.dtype, t.dims) for t in inputs], [])
    for member in range(m.num_members):
        for t in outputs:
            config.output.add(name=f"{t.name}_{member}", data_type=t.dtype, dims=list(t.dims))
        step = config.ensemble_scheduling.step.add(
            model_name=member_model_name(m.name, member), model_version=-1
        )
        for name in MEMBER_INPUTS:
            step.input_map[name] = name
        for t in outputs:
            step.output_map[t.name] = f"{t.name}_{member}"
    if max_inflight_requests:  # 0 = no limit; older servers do not know the field
        config.ensemble_scheduling.max_inflight_requests = max_inflight_requests
    _param(config, MANIFEST_PARAMETER, json.dumps(manifest_identity(bundle), sort_keys=True))
    if reduce == "server":
        _param(config, REDUCE_PARAMETER, "server")
    return config


def _reduce_tensors(bundle: Bundle) -> tuple[list[_Tensor], list[_Tensor]]:
    """Inputs (the members' outputs) and outputs of the reduction step."""
    m = bundle.manifest
    k, s, n = m.num_classes, m.num_samples, m.num_members
    sp = (-1,) * m.input.dims
    _, member_outputs = _member_tensors(bundle)
    inputs = [
        _Tensor(f"{t.name}_{i}", t.dtype, t.dims)
        for i in range(n)
        for t in member_outputs
        if t.name != "sample_labels"
    ]
    outputs = [  # Triton's dims leave out the batch
        _Tensor(name, _MC_TYPES[dtype], tuple(int(d) for d in shape[1:]))
        for name, dtype, shape in reduced_outputs({"B": -1, "M": n, "S": s, "K": k}, sp)
    ]
    return inputs, outputs


def reduce_config(
    bundle: Bundle, flavour: str, *, max_batch_size: int, max_queue_delay_us: int
) -> mc.ModelConfig:
    """The ``ModelConfig`` of the reduction step (one instance: it is element-wise work)."""
    name = reduce_model_name(bundle.manifest.name)
    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    _add_io(config, *_reduce_tensors(bundle))
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    if flavour == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)
    else:
        config.backend = "python"
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
        _param(config, "onnx_file", "model.onnx")
        _param(config, "intra_op_threads", 0)
        _param(config, "uqserve_num_members", 1)
        _param(config, "uqserve_role", "reduce")
    return config


def reduced_ensemble_config(
    bundle: Bundle, *, max_batch_size: int, max_inflight_requests: int
) -> mc.ModelConfig:
    """``<bundle>_reduced``: the members without sample labels, then the reduction step."""
    config = ensemble_config(
        bundle,
        max_batch_size=max_batch_size,
        max_inflight_requests=max_inflight_requests,
        samples=False,
        reduce="server",
    )
    config.name = reduced_model_name(bundle.manifest.name)
    del config.output[:]  # the members' outputs stay inside the server
    inputs, outputs = _reduce_tensors(bundle)
    step = config.ensemble_scheduling.step.add(
        model_name=reduce_model_name(bundle.manifest.name), model_version=-1
    )
    for t in inputs:
        step.input_map[t.name] = t.name
    for t in outputs:
        step.output_map[t.name] = t.name
        config.output.add(name=t.name, data_type=t.dtype, dims=list(t.dims))
    return config


def _config_text(config: mc.ModelConfig, flavour: str, bundle_name: str) -> str:
    header = (
        f"# Written by `uqserve repo` for bundle {bundle_name!r} (flavour {flavour}).\n"
        "# Regenerate it instead of editing it.\n"
    )
    return header + text_format.MessageToString(config, use_short_repeated_primitives=True)


def write_repository(
    bundle: BundleLike | Sequence[BundleLike] | None,
    out_dir: str | os.PathLike[str],
    flavour: str = "python",
    *,
    member_files: str = "copy",
    max_batch_size: int = 32,
    instances: int | None = None,
    threads: int | None = None,
    max_inflight_requests: int | None = None,
    max_queue_delay_us: int = 1000,
    reduce: str = "client",
    overwrite: bool = False,
) -> Path:
    """Write a Triton model repository for one or several bundles to ``out_dir``.

    ``flavour``: ``python`` (CPU, pip-installed tritonserver) or ``onnxruntime``
    (GPU, NGC image). ``member_files``: ``copy`` makes a self-contained
    repository; ``symlink`` links each ``model.onnx`` to the bundle's file
    (and the python flavour's ``model.py`` to uqserve's template) with a
    relative path (no duplicated bytes; used for the committed
    ``model_repository/``). ``instances`` per member defaults to 2 for python
    (two batches in flight per member) and 1 for onnxruntime (one per GPU).
    ``threads`` (onnxruntime intra-op threads per instance) defaults to cores /
    (instances x members), decided on the serving machine at load time.
    ``max_inflight_requests`` bounds the requests in flight at each ensemble
    step (memory); it defaults to 16 for onnxruntime and is left out (0) for
    python, because the Triton 2.51 of nvidia-pytriton rejects the field.
    ``reduce``: ``client`` (the members' outputs go to the client) or
    ``server`` (a reduction step and the ``<bundle>_reduced`` ensemble are
    added; needs the ``onnx`` package).

    The repository is written to a temporary sibling folder and renamed, so a
    failure leaves nothing behind. Returns ``out_dir``.
    """
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    if reduce not in REDUCE_MODES:
        raise RepositoryError(f"unknown reduce {reduce!r}: use one of {', '.join(REDUCE_MODES)}")
    if member_files not in MEMBER_FILES:
        raise RepositoryError(
            f"unknown member_files {member_files!r}: use one of {', '.join(MEMBER_FILES)}"
        )
    for name, value, low in (
        ("max_batch_size", max_batch_size, 1),
        ("instances", instances, 1),
        ("threads", threads, 1),
        ("max_inflight_requests", max_inflight_requests, 0),
        ("max_queue_delay_us", max_queue_delay_us, 0),
    ):
        if value is not None and (not isinstance(value, int) or value < low):
            raise RepositoryError(f"{name} must be an integer >= {low}, got {value!r}")
    if bundle is None or isinstance(bundle, Bundle | str | os.PathLike):
        specs: list[BundleLike | None] = [bundle]
    else:
        specs = list(bundle)
    if not specs:
        raise RepositoryError("no bundle given: pass at least one bundle")
    bundles = [load_bundle(b) if not isinstance(b, Bundle) else b for b in specs]
    names = [b.manifest.name for b in bundles]
    if len(set(names)) != len(names):
        raise RepositoryError(f"bundle names must differ within one repository, got {names}")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RepositoryError(f"{out}: folder is not empty; pass `overwrite=True` to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if instances is None:
        instances = 2 if flavour == "python" else 1
    if max_inflight_requests is None:
        max_inflight_requests = 0 if flavour == "python" else 16

    # Servers may run as another user: the folder is opened up to 0755.
    with replace_dir_atomically(out) as tmp:
        for b in bundles:
            _write_bundle(
                b,
                tmp,
                final=out,
                flavour=flavour,
                member_files=member_files,
                max_batch_size=max_batch_size,
                instances=instances,
                threads=threads,
                max_inflight_requests=max_inflight_requests,
                max_queue_delay_us=max_queue_delay_us,
                reduce=reduce,
            )
        validate_repository(tmp)
    return out


def _write_bundle(
    bundle: Bundle,
    root: Path,
    *,
    final: Path,
    flavour: str,
    member_files: str,
    max_batch_size: int,
    instances: int,
    threads: int | None,
    max_inflight_requests: int,
    max_queue_delay_us: int,
    reduce: str,
) -> None:
    m = bundle.manifest
    for member in range(m.num_members):
        config = member_config(
            bundle,
            member,
            flavour,
            max_batch_size=max_batch_size,
            instances=instances,
            threads=threads,
            max_queue_delay_us=max_queue_delay_us,
        )
        version_dir = _model_dir(root, config.name)
        (version_dir.parent / "config.pbtxt").write_text(_config_text(config, flavour, m.name))
        files = {"model.onnx": bundle.member_path(member).resolve()}
        if flavour == "python":
            files["model.py"] = TEMPLATE
        # Links are relative to where they will live after the rename (same depth as tmp).
        final_dir = final.resolve() / config.name / VERSION
        for name, source in files.items():
            if member_files == "symlink":
                (version_dir / name).symlink_to(os.path.relpath(source, final_dir))
            else:
                shutil.copyfile(source, version_dir / name)
    for samples in (True, False):
        config = ensemble_config(
            bundle,
            max_batch_size=max_batch_size,
            max_inflight_requests=max_inflight_requests,
            samples=samples,
            reduce=reduce,
        )
        _write_ensemble(root, config, flavour, m.name)
    if reduce == "server":
        _write_reduce(
            bundle, root, flavour, max_batch_size=max_batch_size,
            max_inflight_requests=max_inflight_requests, max_queue_delay_us=max_queue_delay_us,
        )  # fmt: skip


def _model_dir(root: Path, model: str) -> Path:
    """Create ``root/model/VERSION``: the one place a model name becomes a path.

    A name that would leave ``root`` (``..``, ``/``, an absolute path) or is
    not a valid model name is refused before anything is created.
    """
    base = root.resolve()
    folder = (base / model).resolve()
    if name_problem(model) or folder.parent != base or not folder.is_relative_to(base):
        raise RepositoryError(
            f"model name {model!r} is not a folder name inside the repository; "
            "rename the bundle (letters, digits, '_', '-', '.')"
        )
    version_dir = folder / VERSION
    version_dir.mkdir(parents=True)
    return version_dir


def _write_ensemble(root: Path, config: mc.ModelConfig, flavour: str, bundle_name: str) -> None:
    version_dir = _model_dir(root, config.name)
    # Triton needs the version folder even for an ensemble; git keeps no empty folders.
    (version_dir / ".gitkeep").write_text("")
    (version_dir.parent / "config.pbtxt").write_text(_config_text(config, flavour, bundle_name))


def _write_reduce(
    bundle: Bundle,
    root: Path,
    flavour: str,
    *,
    max_batch_size: int,
    max_inflight_requests: int,
    max_queue_delay_us: int,
) -> None:
    """The reduction model (a generated graph, always a file) and its ensemble."""
    from uqserve.serving.reduce import reduce_graph

    m = bundle.manifest
    config = reduce_config(
        bundle, flavour, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us
    )
    version_dir = _model_dir(root, config.name)
    (version_dir.parent / "config.pbtxt").write_text(_config_text(config, flavour, m.name))
    graph = reduce_graph(m.num_members, m.num_classes, m.num_samples, dims=m.input.dims)
    (version_dir / "model.onnx").write_bytes(graph)
    if flavour == "python":
        shutil.copyfile(TEMPLATE, version_dir / "model.py")
    ensemble = reduced_ensemble_config(
        bundle, max_batch_size=max_batch_size, max_inflight_requests=max_inflight_requests
    )
    _write_ensemble(root, ensemble, flavour, m.name)


# --------------------------------------------------------------------------- validation


def read_config(path: str | os.PathLike[str]) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` with Triton's schema; ``RepositoryError`` names the line."""
    p = Path(path)
    try:
        return text_format.Parse(p.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{p}: not a valid Triton model config ({exc})") from exc
    except OSError as exc:
        raise RepositoryError(f"{p}: cannot read ({exc.strerror})") from exc


@dataclass(frozen=True)
class _GraphTensor:
    dtype: int
    shape: tuple[int | None, ...]  # None = symbolic/dynamic


def _graph_signature(path: Path) -> tuple[dict[str, _GraphTensor], dict[str, _GraphTensor]]:
    import onnxruntime as ort  # the client's base dependency; imported only to validate

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise RepositoryError(f"{path}: not a loadable ONNX graph ({exc})") from exc

    def sig(args: Any) -> dict[str, _GraphTensor]:
        return {
            a.name: _GraphTensor(
                _ORT_TYPES.get(a.type, mc.TYPE_INVALID),
                tuple(d if isinstance(d, int) else None for d in a.shape),
            )
            for a in args
        }

    return sig(sess.get_inputs()), sig(sess.get_outputs())


def _check_tensor(
    where: str, t: mc.ModelInput | mc.ModelOutput, graph: _GraphTensor, batched: bool
) -> list[str]:
    problems = []
    kind = mc.DataType.Name(t.data_type)
    if graph.dtype != t.data_type:
        problems.append(
            f"{where}: tensor {t.name!r} is {kind} in the config but "
            f"{mc.DataType.Name(graph.dtype)} in the ONNX graph"
        )
    dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
    full = ([-1] if batched else []) + dims
    if len(full) != len(graph.shape):
        problems.append(
            f"{where}: tensor {t.name!r} has rank {len(full)} in the config "
            f"(batch {'included' if batched else 'none'}) but {len(graph.shape)} in the ONNX graph"
        )
    else:
        for axis, (c, g) in enumerate(zip(full, graph.shape, strict=True)):
            if c != -1 and g is not None and c != g:
                problems.append(
                    f"{where}: tensor {t.name!r} axis {axis} is {c} in the config "
                    f"but {g} in the ONNX graph"
                )
    return problems


def validate_repository(path: str | os.PathLike[str]) -> list[str]:
    """Check every model in a repository; return the model names, sorted.

    Each ``config.pbtxt`` must parse with Triton's schema and name its folder;
    every tensor of an ONNX-backed model (onnxruntime platform or uqserve's
    python model) must exist in the graph with the same type and rank, and
    every graph input must be fed; ensembles must wire existing models and
    tensors with matching types; a ``uqserve_sha256`` parameter must match the
    graph file. Raises ``RepositoryError`` listing every problem found.
    """
    root = Path(path)
    if not root.is_dir():
        raise RepositoryError(f"{root}: no such repository folder")
    configs: dict[str, mc.ModelConfig] = {}
    problems: list[str] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_path = d / "config.pbtxt"
        if not cfg_path.is_file():
            problems.append(f"{d}: model folder without config.pbtxt")
            continue
        config = read_config(cfg_path)
        if config.name and config.name != d.name:
            problems.append(f"{cfg_path}: name {config.name!r} differs from its folder {d.name!r}")
        if not any(v.is_dir() and v.name.isdigit() for v in d.iterdir()):
            problems.append(f"{d}: no numeric version folder (e.g. {d / VERSION})")
        configs[d.name] = config
    if not configs:
        problems.append(f"{root}: no models (no sub-folder with a config.pbtxt)")

    for name, config in configs.items():
        where = str(root / name / "config.pbtxt")
        if config.platform == "ensemble":
            problems += _check_ensemble(where, config, configs)
            continue
        onnx_file = _onnx_file(root / name, config)
        if onnx_file is None:
            continue  # not an ONNX-backed model: nothing more to check
        if not onnx_file.is_file():
            problems.append(f"{where}: graph file {onnx_file} is missing")
            continue
        sha = (
            config.parameters["uqserve_sha256"].string_value
            if "uqserve_sha256" in config.parameters
            else ""
        )
        if sha and sha256_file(onnx_file) != sha:
            problems.append(f"{onnx_file}: sha256 differs from the config's uqserve_sha256")
        g_in, g_out = _graph_signature(onnx_file)
        batched = config.max_batch_size > 0
        for t in config.input:
            if t.name not in g_in:
                problems.append(f"{where}: input {t.name!r} is not an input of {onnx_file.name}")
            else:
                problems += _check_tensor(where, t, g_in[t.name], batched)
        for t in config.output:
            if t.name not in g_out:
                problems.append(f"{where}: output {t.name!r} is not an output of {onnx_file.name}")
            else:
                problems += _check_tensor(where, t, g_out[t.name], batched)
        fed = {t.name for t in config.input}
        for missing in sorted(set(g_in) - fed):
            problems.append(f"{where}: graph input {missing!r} is not declared in the config")
    if problems:
        raise RepositoryError("; ".join(problems))
    return sorted(configs)


def _onnx_file(model_dir: Path, config: mc.ModelConfig) -> Path | None:
    version = VERSION
    versions = sorted(
        (v for v in model_dir.iterdir() if v.name.isdigit()), key=lambda v: int(v.name)
    )
    if versions:
        version = versions[-1].name
    if config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime":
        return model_dir / version / (config.default_model_filename or "model.onnx")
    if config.backend == "python" and "onnx_file" in config.parameters:
        return model_dir / version / config.parameters["onnx_file"].string_value
    return None


def _check_ensemble(
    where: str, config: mc.ModelConfig, configs: dict[str, mc.ModelConfig]
) -> list[str]:
    problems = []
    # Tensor name -> (data type, dims) as known so far: ensemble inputs, then step outputs.
    known: dict[str, tuple[int, tuple[int, ...]]] = {
        t.name: (t.data_type, tuple(t.dims)) for t in config.input
    }
    for step in config.ensemble_scheduling.step:
        target = configs.get(step.model_name)
        if target is None:
            problems.append(f"{where}: step model {step.model_name!r} is not in the repository")
            continue
        if target.max_batch_size < config.max_batch_size:
            problems.append(
                f"{where}: max_batch_size {config.max_batch_size} exceeds that of "
                f"{step.model_name!r} ({target.max_batch_size})"
            )
        t_in = {t.name: t for t in target.input}
        t_out = {t.name: t for t in target.output}
        for model_input, tensor in step.input_map.items():
            if model_input not in t_in:
                problems.append(f"{where}: {step.model_name!r} has no input {model_input!r}")
            elif tensor not in known:
                problems.append(f"{where}: step input {tensor!r} is produced by no earlier step")
            elif known[tensor][0] != t_in[model_input].data_type:
                problems.append(
                    f"{where}: {tensor!r} -> {step.model_name}.{model_input}: type differs"
                )
        for missing in sorted(set(t_in) - set(step.input_map)):
            if not t_in[missing].optional:
                problems.append(f"{where}: {step.model_name!r} input {missing!r} is not mapped")
        for model_output, tensor in step.output_map.items():
            if model_output not in t_out:
                problems.append(f"{where}: {step.model_name!r} has no output {model_output!r}")
            else:
                known[tensor] = (t_out[model_output].data_type, tuple(t_out[model_output].dims))
    for t in config.output:
        if t.name not in known:
            problems.append(f"{where}: ensemble output {t.name!r} is produced by no step")
        elif known[t.name] != (t.data_type, tuple(t.dims)):
            problems.append(
                f"{where}: ensemble output {t.name!r} type or dims differ from its step"
            )
    return problems


__all__ = [
    "FLAVOURS",
    "MANIFEST_PARAMETER",
    "NOSAMPLES_SUFFIX",
    "REDUCE_PARAMETER",
    "BundleError",
    "RepositoryError",
    "ensemble_config",
    "manifest_identity",
    "member_config",
    "member_model_name",
    "nosamples_model_name",
    "read_config",
    "reduce_config",
    "reduce_model_name",
    "reduced_ensemble_config",
    "reduced_model_name",
    "served_identity",
    "validate_repository",
    "write_repository",
]
