"""Member graphs with a float16 network body and float32 inputs and outputs.

``--precision fp16`` runs the convolutional body of each member graph
(``Conv``, ``ConvTranspose`` and the element-wise activations between them)
in float16, as PyTorch autocast does for nnU-Net inference. Everything else
stays float32: the graph inputs and outputs, instance normalisation (autocast
keeps norms in float32 too), the sampling head, the counter-based noise,
softmax and the entropies. Casts are inserted at the borders.

Converted graphs are cached on disk under ``cache_dir()`` keyed by the
member's sha256 and :data:`CONVERTER_VERSION`, so a bundle is converted once
per machine, not once per process.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from uqserve._fs import atomic_write_bytes
from uqserve.errors import UsageError

#: Bump when the conversion changes: cached graphs of older versions are not reused.
CONVERTER_VERSION = "1"

# Ops run in float16 when they lie between the image and a convolution and all their
# outputs are float tensors. InstanceNormalization is deliberately absent.
_FP16_OPS = frozenset(
    {"Conv", "ConvTranspose", "Mul", "Add", "Sub", "Sigmoid", "Relu", "LeakyRelu", "Concat"}
)
_CONVS = frozenset({"Conv", "ConvTranspose"})


def cache_dir() -> Path:
    """``$UQSERVE_CACHE_DIR`` or ``$XDG_CACHE_HOME/uqserve`` (``~/.cache/uqserve``)."""
    env = os.environ.get("UQSERVE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "uqserve"


def fp16_member(path: Path, sha256: str) -> bytes:
    """The serialised float16-body version of the member graph at ``path``.

    Read from the cache when present; otherwise converted and stored there
    (atomically; an unwritable cache only costs the conversion next time).
    Raises ``UsageError`` when the ``onnx`` package is missing.
    """
    key = hashlib.sha256(f"{sha256}:{CONVERTER_VERSION}".encode()).hexdigest()[:32]
    cached = cache_dir() / "fp16" / f"{key}.onnx"
    if cached.is_file():
        return cached.read_bytes()
    data = convert_fp16(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, data)
    except OSError:
        pass  # read-only home, full disk: run from memory
    return data


def convert_fp16(path: Path) -> bytes:
    """Convert the member graph at ``path``; return the serialised model."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise UsageError(
            "precision 'fp16' needs the onnx package to convert the member graphs: "
            "pip install 'uqserve[gpu]'"
        ) from exc
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    body = _body_nodes(graph, TensorProto.FLOAT)
    nodes = list(graph.node)
    produced_by_body = {o for i, n in enumerate(nodes) if i in body for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    to_half: dict[str, str] = {}  # float32 tensor -> its float16 twin
    new_nodes: list[Any] = []

    def half(name: str) -> str:
        if name in produced_by_body:
            return f"{name}__fp16"
        if name not in to_half:
            to_half[name] = f"{name}__to_fp16"
            if name in inits:
                arr = numpy_helper.to_array(inits[name]).astype("float16")
                graph.initializer.append(numpy_helper.from_array(arr, to_half[name]))
            else:
                cast = helper.make_node("Cast", [name], [to_half[name]], to=TensorProto.FLOAT16)
                new_nodes.append(cast)
        return to_half[name]

    consumed_outside = {x for i, n in enumerate(nodes) if i not in body for x in n.input}
    consumed_outside |= {o.name for o in graph.output}
    for index, node in enumerate(nodes):
        if index not in body:
            new_nodes.append(node)
            continue
        inputs = [half(i) if i else i for i in node.input]
        outputs = list(node.output)
        del node.input[:]
        node.input.extend(inputs)
        del node.output[:]
        node.output.extend(f"{o}__fp16" for o in outputs)
        new_nodes.append(node)
        for o in outputs:
            if o in consumed_outside:
                new_nodes.append(
                    helper.make_node(
                        "Cast", [f"{o}__fp16"], [o], to=TensorProto.FLOAT, name=f"{o}__cast_fp32"
                    )
                )
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Inferred float32 types of renamed tensors would contradict their float16 twins.
    keep = [v for v in graph.value_info if v.name not in produced_by_body]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _body_nodes(graph: Any, float_type: int) -> set[int]:
    """Indices of the nodes to run in float16: float-valued ``_FP16_OPS`` nodes that
    depend on the image input and feed a convolution (or are one)."""
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)})
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    from_image: set[str] = {"image"}
    for node in nodes:  # nodes are topologically sorted
        if any(i in from_image for i in node.input):
            from_image.update(node.output)
    feeds_conv: set[int] = set()
    stack = [i for i, n in enumerate(nodes) if n.op_type in _CONVS]
    while stack:
        index = stack.pop()
        if index in feeds_conv:
            continue
        feeds_conv.add(index)
        stack.extend(producer[i] for i in nodes[index].input if i in producer)
    return {
        i
        for i, n in enumerate(nodes)
        if n.op_type in _FP16_OPS
        and i in feeds_conv
        and all(o in from_image and types.get(o) == float_type for o in n.output)
    }
