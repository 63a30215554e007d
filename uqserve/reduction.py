"""The reduction graph: the members' outputs summed where they were computed.

The step after the members of a ``--reduce server`` Triton ensemble
(``uqserve.serving.reduce``), and of the embedded runtime's
``reduce="graph"`` (on the GPU: only the sums come back to the host).

Without it, every member's p̄_m, mean sample entropy and counts cross the
network: M x (K + 1) floats per voxel. With it, a small ONNX graph after the
members returns what the client's streaming ``Accumulator`` needs, K + 2
floats and one byte per voxel:

=====================  ================  =========================================
``mean_sum``           ``[B, K, H, W]``  Σ_m p̄_m (added in member order, float32)
``entropy_sum``        ``[B, H, W]``     Σ_m H[p̄_m], nats, ``0 ln 0 = 0``
``sample_entropy_sum`` ``[B, H, W]``     Σ_m (1/S) Σ_s H[p_{m,s}]
``foreground``         ``[B, H, W]``     bool: some member's argmax is a class >= 1
``sample_counts``      ``[B, M, S, K]``  every member's per-sample class counts
=====================  ================  =========================================

The graph's inputs are the members' outputs, ``mean_<m>``,
``sample_entropy_<m>`` and ``sample_counts_<m>``. Building it needs the
``onnx`` package (the ``server`` or ``export`` extra).
"""

from __future__ import annotations

from typing import Any

from uqserve.contracts import reduced_outputs
from uqserve.errors import UsageError

__all__ = ["OPSET", "reduce_graph"]

OPSET = 17


def reduce_graph(num_members: int, num_classes: int, num_samples: int, dims: int = 2) -> bytes:
    """The serialised ONNX reduction graph for M members, K classes, S samples.

    ``dims``: the members' spatial axes (2: ``H, W``; 3: ``D, H, W``).
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as exc:
        raise UsageError(
            "reduce 'server' builds an ONNX graph and needs the onnx package: "
            "pip install 'uqserve[server]'"
        ) from exc
    M, K, S = num_members, num_classes, num_samples
    if M < 1 or K < 2 or S < 1:
        raise UsageError(f"reduce_graph: need M >= 1, K >= 2, S >= 1, got {M}, {K}, {S}")
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    sp = ["H", "W"] if dims == 2 else ["D", "H", "W"]
    inputs, nodes = [], []
    for m in range(M):
        inputs += [
            helper.make_tensor_value_info(f"mean_{m}", f32, ["B", K, *sp]),
            helper.make_tensor_value_info(f"sample_entropy_{m}", f32, ["B", *sp]),
            helper.make_tensor_value_info(f"sample_counts_{m}", f32, ["B", S, K]),
        ]
    consts = {
        "axis1": helper.make_tensor("axis1", i64, [1], [1]),
        "zero_i": helper.make_tensor("zero_i", i64, [1], [0]),
        "one_i": helper.make_tensor("one_i", i64, [1], [1]),
        "big_i": helper.make_tensor("big_i", i64, [1], [K]),
        "zero_f": helper.make_tensor("zero_f", f32, [], [0.0]),
    }

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    for m in range(M):
        p = f"mean_{m}"
        # H[p̄_m] = -Σ_k p ln p with 0 ln 0 = 0 (Where drops the NaN of 0 x -inf).
        plogp = node("Mul", [p, node("Log", [p], f"log_{m}")], f"plogp_{m}")
        safe = node("Where", [node("Greater", [p, "zero_f"], f"pos_{m}"), plogp, "zero_f"],
                    f"safe_{m}")  # fmt: skip
        node("Neg", [node("ReduceSum", [safe, "axis1"], f"negh_{m}", keepdims=0)], f"h_{m}")
        # argmax_k p != 0  <=>  max_{k >= 1} p_k > p_0 (ties go to the background).
        p0 = node("Slice", [p, "zero_i", "one_i", "axis1"], f"p0_{m}")
        rest = node("Slice", [p, "one_i", "big_i", "axis1"], f"rest_{m}")
        best = node("ReduceMax", [rest], f"best_{m}", axes=[1], keepdims=1)
        node("Squeeze", [node("Greater", [best, p0], f"fg4_{m}"), "axis1"], f"fg_{m}")
        node("Unsqueeze", [f"sample_counts_{m}", "axis1"], f"counts_{m}")
    _chain(node, "Add", [f"mean_{m}" for m in range(M)], "mean_sum")
    _chain(node, "Add", [f"h_{m}" for m in range(M)], "entropy_sum")
    _chain(node, "Add", [f"sample_entropy_{m}" for m in range(M)], "sample_entropy_sum")
    _chain(node, "Or", [f"fg_{m}" for m in range(M)], "foreground")
    if M == 1:
        node("Identity", ["counts_0"], "sample_counts")
    else:
        node("Concat", [f"counts_{m}" for m in range(M)], "sample_counts", axis=1)
    types = {"float32": f32, "bool": TensorProto.BOOL}
    outputs = [
        helper.make_tensor_value_info(name, types[dtype], list(shape))
        for name, dtype, shape in reduced_outputs({"B": "B", "M": M, "S": S, "K": K}, tuple(sp))
    ]
    graph = helper.make_graph(
        nodes, "uqserve_reduce", inputs, outputs, initializer=list(consts.values())
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="uqserve"
    )
    model.ir_version = 8  # readable by onnxruntime >= 1.10 (Triton's backends included)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _chain(node: Any, op: str, names: list[str], out: str) -> None:
    """``((a0 op a1) op a2) ...`` in member order: float32 sums as the Accumulator adds them."""
    if len(names) == 1:
        node("Identity", names, out)
        return
    acc = names[0]
    for i, name in enumerate(names[1:], start=1):
        acc = node(op, [acc, name], out if i == len(names) - 1 else f"{out}_{i}")
