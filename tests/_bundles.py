"""Tiny, real, contract-conforming bundles for tests (no torch).

``make_tiny_bundle`` writes a bundle folder whose member graphs are built with
``onnx.helper`` and follow docs/architecture.md exactly (inputs ``image``,
``seed``, ``offset``, ``valid``; outputs ``mean``, ``sample_entropy``,
``sample_counts``, ``sample_labels``). Each member is a cheap deterministic
function of the image (a 3x3 convolution, then class logits from the distance
to per-class intensity centres) with member-dependent weights, so members
disagree a little (EU > 0). For every AU method except ``softmax`` each sample
adds noise from an integer hash computed in the graph:

* global noise ``g(seed, member, sample, class)``: one shift per sample and
  class, the same for every voxel, so sample ``s`` is one coherent
  segmentation of the whole volume (volume distributions mean something);
* per-pixel noise ``e(seed, member, sample, class, z, y0 + y, x0 + x)`` from
  the global voxel position, so results do not depend on batching or tiling.

The hash is exact int64 arithmetic (``h = (h * h + c) mod (2^31 - 1)``, values
stay below 2^62), fed one key at a time, so onnxruntime and any other runtime
agree bit for bit on the noise. Noise is uniform with unit variance (no
Box-Muller needed for a test double).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uqserve.bundle import (
    InputSpec,
    Manifest,
    Member,
    Normalization,
    OODSpec,
    write_manifest,
)

OPSET = 18
_P = 2_147_483_647  # 2^31 - 1: h * h + c stays below 2^63
_ROUND_CONSTANTS = (1_013_904_223, 374_761_393, 668_265_263, 2_246_822_519 % _P, 3_266_489_917 % _P)


def make_tiny_bundle(
    path: str | os.PathLike[str],
    *,
    au: str = "ssn",
    eu: str = "ensemble",
    num_members: int = 2,
    num_samples: int = 3,
    num_classes: int = 2,
    seed: int = 0,
    tile_size: tuple[int, int] = (32, 32),
    multiple: int = 8,
    normalization: Normalization | None = None,
    global_noise: float = 0.6,
    pixel_noise: float = 0.8,
    name: str | None = None,
) -> Path:
    """Write a tiny bundle to the folder ``path`` (created) and return it.

    ``au="softmax"`` needs ``num_samples=1``; ``eu="none"`` needs one member
    (the manifest validation enforces the same rules as real bundles).
    Class ``k`` wins where the blurred normalised intensity is near centre
    ``c_k`` (``linspace(-1, 1, K)``): with z-score normalisation bright voxels
    are foreground.
    """
    if au == "softmax" and num_samples != 1:
        raise ValueError("au 'softmax' draws exactly one sample: pass num_samples=1")
    if eu == "none" and num_members != 1:
        raise ValueError("eu 'none' has one member: pass num_members=1")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    noisy = au != "softmax"
    members = []
    for m in range(num_members):
        model = member_graph(
            member=m,
            num_samples=num_samples,
            num_classes=num_classes,
            weight_seed=seed,
            global_noise=global_noise if noisy else 0.0,
            pixel_noise=pixel_noise if noisy else 0.0,
        )
        file = f"member_{m}.onnx"
        data = model.SerializeToString()
        (folder / file).write_bytes(data)
        members.append(Member(file=file, sha256=hashlib.sha256(data).hexdigest()))
    classes = ("background", *(f"class{k}" for k in range(1, num_classes)))
    if num_classes == 2:
        classes = ("background", "lesion")
    manifest = Manifest(
        name=name or folder.name,
        au=au,
        eu=eu,
        num_members=num_members,
        num_samples=num_samples,
        classes=classes,
        members=tuple(members),
        input=InputSpec(
            channels=1,
            tile_size=tile_size,
            multiple=multiple,
            normalization=normalization or Normalization(scheme="zscore"),
        ),
        seed=seed,
        default_aggregator="mean",
        ood=OODSpec(
            aggregator="mean",
            threshold=0.05,
            quantile=0.95,
            validation_scores=tuple(float(v) for v in np.linspace(0.0, 0.06, 13)),
        ),
        entanglement={"delta": 0.1, "note": "tiny test bundle"},
        opset=OPSET,
        uqserve_version="test",
        created="1970-01-01T00:00:00Z",
        extra={"tiny": True},
    )
    write_manifest(folder, manifest)
    return folder


def member_graph(
    *,
    member: int,
    num_samples: int,
    num_classes: int,
    weight_seed: int = 0,
    global_noise: float = 0.6,
    pixel_noise: float = 0.8,
    channels: int = 1,
) -> onnx.ModelProto:
    """One member graph with the architecture.md signature (dynamic B, H, W)."""
    S, K = num_samples, num_classes
    rng = np.random.default_rng([weight_seed, member])
    kernel = np.full((1, channels, 3, 3), 0.04, np.float32)
    kernel[0, :, 1, 1] = 0.68
    kernel += rng.normal(0.0, 0.02, kernel.shape).astype(np.float32)
    kernel /= channels
    centres = np.linspace(-1.0, 1.0, K) + rng.normal(0.0, 0.05, K)
    sharp = np.float32(2.0 + 0.3 * member)

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray | float | int, dtype: type = np.int64) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    # --- deterministic logits [B, K, H, W] -------------------------------------------------
    const("kernel", kernel, np.float32)
    node("Conv", ["image", "kernel"], "blur", pads=[1, 1, 1, 1])  # [B, 1, H, W]
    const("centres", centres.reshape(1, K, 1, 1), np.float32)
    node("Sub", ["blur", "centres"], "dist")
    node("Mul", ["dist", "dist"], "dist2")
    const("neg_sharp", -sharp, np.float32)
    node("Mul", ["dist2", "neg_sharp"], "logits")  # [B, K, H, W]
    const("ax1", [1])
    node("Unsqueeze", ["logits", "ax1"], "logits5")  # [B, 1, K, H, W]

    # --- shapes and coordinates -------------------------------------------------------------
    node("Shape", ["image"], "shape")
    const("i0", [0])
    const("i1", [1])
    const("i2", [2])
    const("i3", [3])
    node("Slice", ["shape", "i2", "i3"], "H")  # [1]
    node("Slice", ["shape", "i3", const("i4", [4])], "W")
    const("zero", 0)
    const("one", 1)
    node("Squeeze", ["H"], "H0")
    node("Squeeze", ["W"], "W0")
    node("Range", ["zero", "H0", "one"], "ys")  # [H]
    node("Range", ["zero", "W0", "one"], "xs")  # [W]
    # offset [B, 3] -> z, y0, x0 as [B, 1]
    node("Slice", ["offset", "i0", "i1", "i1"], "z_b")
    node("Slice", ["offset", "i1", "i2", "i1"], "y0_b")
    node("Slice", ["offset", "i2", "i3", "i1"], "x0_b")
    node("Add", ["y0_b", node("Unsqueeze", ["ys", "i0"], "ys_row")], "y_bh")  # [B, H]
    node("Add", ["x0_b", node("Unsqueeze", ["xs", "i0"], "xs_row")], "x_bw")  # [B, W]

    # --- valid mask [B, 1, 1, H, W] ---------------------------------------------------------
    node("Slice", ["valid", "i0", "i1", "i1"], "rows_b")  # [B, 1]
    node("Slice", ["valid", "i1", "i2", "i1"], "cols_b")
    node("Less", [node("Unsqueeze", ["ys", "i0"], "ys_row2"), "rows_b"], "ymask")  # [B, H]
    node("Less", [node("Unsqueeze", ["xs", "i0"], "xs_row2"), "cols_b"], "xmask")  # [B, W]
    node("Unsqueeze", ["ymask", const("ax_m1", [2])], "ymask3")  # [B, H, 1]
    node("Unsqueeze", ["xmask", "ax1"], "xmask3")  # [B, 1, W]
    node("And", ["ymask3", "xmask3"], "mask_bhw")
    node("Cast", ["mask_bhw"], "maskf_bhw", to=TensorProto.FLOAT)
    node("Unsqueeze", ["maskf_bhw", const("ax12", [1, 2])], "maskf")  # [B, 1, 1, H, W]

    sample_logits = "logits5"
    if global_noise > 0 or pixel_noise > 0:
        # Keys, broadcastable to [B, S, K, H, W].
        node("Reshape", ["seed", const("sh_b", [-1, 1, 1, 1, 1])], "k_seed")
        const("k_member", np.full((1, 1, 1, 1, 1), member, np.int64))
        const("k_sample", np.arange(S, dtype=np.int64).reshape(1, S, 1, 1, 1))
        const("k_class", np.arange(K, dtype=np.int64).reshape(1, 1, K, 1, 1))
        node("Reshape", ["z_b", "sh_b"], "k_z")
        node("Reshape", ["y_bh", const("sh_y", [0, 1, 1, -1, 1])], "k_y")
        node("Reshape", ["x_bw", const("sh_x", [0, 1, 1, 1, -1])], "k_x")
        const("P", _P)

        counter = [0]

        def mix(h: str, key: str) -> str:
            """h <- ((h + key mod P) ** 2 + c) mod P, exact in int64."""
            i = counter[0]
            counter[0] += 1
            c = const(f"c{i}", _ROUND_CONSTANTS[i % len(_ROUND_CONSTANTS)])
            k = node("Mod", [key, "P"], f"km{i}")
            a = node("Mod", [node("Add", [h, k], f"ha{i}"), "P"], f"hb{i}")
            sq = node("Mul", [a, a], f"hs{i}")
            return node("Mod", [node("Add", [sq, c], f"hc{i}"), "P"], f"h{i}")

        def to_uniform(h: str, tag: str) -> str:
            """int hash -> uniform noise with mean 0, variance 1."""
            f = node("Cast", [h], f"{tag}_f", to=TensorProto.DOUBLE)
            u = node("Div", [f, const(f"{tag}_p", float(_P), np.float64)], f"{tag}_u")
            u32 = node("Cast", [u], f"{tag}_u32", to=TensorProto.FLOAT)
            c = node("Sub", [u32, const(f"{tag}_half", 0.5, np.float32)], f"{tag}_c")
            return node("Mul", [c, const(f"{tag}_s", np.sqrt(12.0), np.float32)], f"{tag}_n")

        const("h_init", 12345)
        h = mix("h_init", "k_seed")
        h = mix(h, "k_member")
        h = mix(h, "k_sample")
        hg = mix(h, "k_class")  # [B, S, K, 1, 1]: global (per sample) noise
        hg = mix(hg, const("stream_g", 1))
        eps_g = to_uniform(hg, "g")
        hp = mix(hg, const("stream_p", 2))
        hp = mix(hp, "k_z")
        hp = mix(hp, "k_y")
        hp = mix(hp, "k_x")
        hp = mix(hp, const("k_final", 7))  # extra round: decorrelate neighbours
        eps_p = to_uniform(hp, "p")  # [B, S, K, H, W]
        ng = node("Mul", [eps_g, const("sg", global_noise, np.float32)], "ng")
        npx = node("Mul", [eps_p, const("sp", pixel_noise, np.float32)], "npx")
        node("Add", ["logits5", ng], "ls_g")
        sample_logits = node("Add", ["ls_g", npx], "ls")  # [B, S, K, H, W]
    elif S > 1:
        # Noise switched off: S identical samples.
        nodes.append(helper.make_node("Concat", ["logits5"] * S, ["ls"], axis=1))
        sample_logits = "ls"

    # --- outputs ---------------------------------------------------------------------------
    node("Softmax", [sample_logits], "p", axis=2)
    node("LogSoftmax", [sample_logits], "logp", axis=2)
    node("ReduceMean", ["p", "ax1"], "mean", keepdims=0)  # [B, K, H, W]
    node("Mul", ["p", "logp"], "plogp")
    node("ReduceSum", ["plogp", const("ax2", [2])], "negent", keepdims=0)  # [B, S, H, W]
    node("ReduceMean", ["negent", "ax1"], "negent_mean", keepdims=0)
    node("Neg", ["negent_mean"], "sample_entropy")  # [B, H, W]
    node("ArgMax", [sample_logits], "labels64", axis=2, keepdims=0)  # [B, S, H, W]
    node("Cast", ["labels64"], "sample_labels", to=TensorProto.UINT8)
    node("Unsqueeze", ["labels64", "ax2"], "labels5")  # [B, S, 1, H, W]
    const("classes5", np.arange(K, dtype=np.int64).reshape(1, 1, K, 1, 1))
    node("Equal", ["labels5", "classes5"], "onehot")
    node("Cast", ["onehot"], "onehotf", to=TensorProto.FLOAT)
    node("Mul", ["onehotf", "maskf"], "onehot_valid")
    node("ReduceSum", ["onehot_valid", const("ax34", [3, 4])], "sample_counts", keepdims=0)

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes,
        f"tiny_member_{member}",
        inputs=[
            helper.make_tensor_value_info("image", f32, ["B", channels, "H", "W"]),
            helper.make_tensor_value_info("seed", i64, ["B"]),
            helper.make_tensor_value_info("offset", i64, ["B", 3]),
            helper.make_tensor_value_info("valid", i64, ["B", 2]),
        ],
        outputs=[
            helper.make_tensor_value_info("mean", f32, ["B", K, "H", "W"]),
            helper.make_tensor_value_info("sample_entropy", f32, ["B", "H", "W"]),
            helper.make_tensor_value_info("sample_counts", f32, ["B", S, K]),
            helper.make_tensor_value_info("sample_labels", TensorProto.UINT8, ["B", S, "H", "W"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    model.producer_name = "uqserve-tests"
    onnx.checker.check_model(model, full_check=True)
    return model
