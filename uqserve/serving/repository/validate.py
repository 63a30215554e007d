"""Check a written repository against Triton's config schema and its ONNX graphs."""

from __future__ import annotations

import os
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from uqserve.bundle import sha256_file
from uqserve.serving.repository.configs import (
    VERSION,
    RepositoryError,
    _GraphTensor,
    graph_signature,
    read_config,
)


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
        g_in, g_out = graph_signature(onnx_file)
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
