"""Triton model configs (``ModelConfig``) of a bundle's members, ensembles, reduction."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from uqserve.bundle import Bundle
from uqserve.contracts import MEMBER_INPUTS, TensorSpec, member_specs, reduced_outputs
from uqserve.errors import UsageError
from uqserve.triton_names import (
    MANIFEST_PARAMETER,
    REDUCE_PARAMETER,
    manifest_identity,
    member_model_name,
    nosamples_model_name,
    reduce_model_name,
    reduced_model_name,
)

VERSION = "1"


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
    found_in, found_out = tensors(inputs), tensors(outputs)
    if returns_logits(bundle):
        found_out.append(_Tensor("logits", mc.TYPE_FP32, (m.num_classes, *[-1] * m.input.dims)))
    return found_in, found_out


def returns_logits(bundle: Bundle) -> bool:
    """Do the members serve their optional ``logits`` (bundles that blend logits, all of
    whose graphs have the output)? Then the client blends them as the embedded runtime does."""
    m = bundle.manifest
    return m.input.blend == "logits" and _all_have_logits(
        tuple(str(bundle.path / x.file) for x in m.members), tuple(x.sha256 for x in m.members)
    )


@functools.lru_cache(maxsize=8)
def _all_have_logits(files: tuple[str, ...], digests: tuple[str, ...]) -> bool:
    """``digests`` key the cache: a rewritten member is read again."""
    return all("logits" in graph_signature(Path(f))[1] for f in files)


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
        if t.name not in ("sample_labels", "logits")
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


@dataclass(frozen=True)
class _GraphTensor:
    dtype: int
    shape: tuple[int | None, ...]  # None = symbolic/dynamic


def graph_signature(path: Path) -> tuple[dict[str, _GraphTensor], dict[str, _GraphTensor]]:
    """``(inputs, outputs)`` of an ONNX graph by name: Triton data type and shape."""
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
