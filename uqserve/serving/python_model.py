"""Triton python-backend model that runs one uqserve member graph with onnxruntime.

This file is a template: ``write_repository(..., flavour="python")`` copies it
verbatim to ``<model>/1/model.py``. It runs inside Triton's python stub, so it
imports only numpy, onnxruntime and ``triton_python_backend_utils`` (never
uqserve), and it is not imported by uqserve itself.

Config parameters it reads (all strings, see ``uqserve.serving.repository``):

``onnx_file``         member graph, relative to the version folder (default ``model.onnx``)
``uqserve_sha256``    expected sha256 of that file; loading fails on a mismatch
``intra_op_threads``  onnxruntime intra-op threads; ``0`` = cores / (instances x members)
``uqserve_num_members``  members served side by side (for the ``0`` rule)
``uqserve_role``      ``member`` (default) or ``reduce``: the ensemble's reduction step,
                      whose inputs are the config's (the members' outputs), fed as they come

Requests that share a tile shape and the same requested outputs are run as
one onnxruntime call; only the requested outputs are computed and returned
(``sample_labels`` is by far the largest and is skipped unless asked for).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUTS = ("image", "seed", "offset", "valid")
OUTPUTS = ("mean", "sample_entropy", "sample_counts", "sample_labels")
DTYPES = {"image": np.float32, "seed": np.int64, "offset": np.int64, "valid": np.int64}


class TritonPythonModel:
    """One member (``[B, C, H, W]`` slices in, its outputs out) or the reduction step."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        path = version_dir / params.get("onnx_file", "model.onnx")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise pb_utils.TritonModelException(
                f"{path}: cannot read the member graph ({exc.strerror}); regenerate the repository"
            ) from exc
        expected = params.get("uqserve_sha256", "")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise pb_utils.TritonModelException(
                f"{path}: sha256 does not match the bundle manifest; regenerate the repository"
            )
        threads = int(params.get("intra_op_threads", "0") or 0)
        if threads <= 0:
            instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
            members = int(params.get("uqserve_num_members", "1") or 1)
            threads = max(1, (os.cpu_count() or 1) // (instances * members))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.member = params.get("uqserve_role", "member") == "member"
        self.inputs = INPUTS if self.member else tuple(t["name"] for t in config["input"])
        self.graph_outputs = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds_of: list[dict[str, np.ndarray] | None] = []
        wanted_of: list[tuple[str, ...]] = []
        errors: dict[int, str] = {}
        for i, request in enumerate(requests):
            try:
                feeds_of.append(_feeds(request, self.inputs, self.member))
            except ValueError as exc:
                feeds_of.append(None)
                errors[i] = str(exc)
            names = [n for n in request.requested_output_names() if n in self.graph_outputs]
            # No explicit request means "all outputs" in Triton's protocol.
            wanted_of.append(tuple(sorted(names)) if names else tuple(self.graph_outputs))

        # Group requests that can share one session run: same tile shape, same outputs.
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, feeds in enumerate(feeds_of):
            if feeds is not None:
                key = (tuple(feeds[n].shape[1:] for n in self.inputs), wanted_of[i])
                groups.setdefault(key, []).append(i)

        results: dict[int, dict[str, np.ndarray]] = {}
        for (_, wanted), members in groups.items():
            batch = {
                name: np.concatenate([feeds_of[i][name] for i in members])  # type: ignore[index]
                for name in self.inputs
            }
            try:
                arrays = self.session.run(list(wanted), batch)
            except Exception as exc:  # onnxruntime raises its own exception types
                for i in members:
                    errors[i] = f"onnxruntime failed: {exc}"
                continue
            start = 0
            for i in members:
                b = feeds_of[i][self.inputs[0]].shape[0]  # type: ignore[index]
                results[i] = {n: a[start : start + b] for n, a in zip(wanted, arrays, strict=True)}
                start += b

        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])))
                continue
            tensors = [
                pb_utils.Tensor(
                    n, np.ascontiguousarray(a, dtype=self.output_dtypes.get(n, a.dtype))
                )
                for n, a in results[i].items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.session = None


def _feeds(request: Any, names: tuple[str, ...], member: bool) -> dict[str, np.ndarray]:
    """The graph inputs of one request; a member's with the graph's shapes and dtypes."""
    feeds = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"input {name!r} is missing")
        feeds[name] = np.asarray(tensor.as_numpy(), dtype=DTYPES.get(name))
    if not member:
        return feeds
    b = feeds["image"].shape[0]
    # The config declares seed as dims [1] (Triton needs a non-empty shape); the graph wants [B].
    feeds["seed"] = feeds["seed"].reshape(b)
    feeds["offset"] = feeds["offset"].reshape(b, 3)
    feeds["valid"] = feeds["valid"].reshape(b, -1)  # [B, 2] slices, [B, 3] volumes
    return feeds
