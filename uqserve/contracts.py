"""The contracts every part of uqserve agrees on, in one place.

- the member-graph signature: input and output names, dtypes and dimensions
  (what an exported ONNX member takes and returns, what a runtime feeds it,
  what the Triton repository declares);
- the image-level aggregator names (``uqserve.uncertainty.image_score``, the
  manifest's ``default_aggregator`` and ``ood.aggregator``);
- the AU and EU method names and their twenty combinations;
- the paper's four OOD corruptions;
- the default class names of a model with K classes.

Pure Python, no numpy or torch: everything imports it cheaply. The Triton
python model (``uqserve/serving/python_model.py``) runs without uqserve and
keeps its own copy of the names; a test checks that the two agree.
"""

from __future__ import annotations

from uqserve.errors import UsageError

__all__ = [
    "AGGREGATORS",
    "AU_METHODS",
    "COMBINATIONS",
    "DEFAULT_AGGREGATOR",
    "EU_METHODS",
    "MEMBER_INPUTS",
    "MEMBER_INPUT_SPEC",
    "MEMBER_INPUT_SPEC_3D",
    "MEMBER_OUTPUTS",
    "MEMBER_OUTPUT_SPEC",
    "MEMBER_OUTPUT_SPEC_3D",
    "OPTIONAL_MEMBER_OUTPUTS",
    "PAPER_SHIFTS",
    "REDUCED_OUTPUT_SPEC",
    "TensorSpec",
    "default_class_names",
    "member_specs",
    "reduced_outputs",
]

# --------------------------------------------------------------------------- methods

#: The aleatoric (AU) and epistemic (EU) methods, and every AU-EU pairing:
#: ``"ssn-ensemble"`` is SSN heads in a deep ensemble.
AU_METHODS = ("softmax", "ssn", "punet", "diffusion")
EU_METHODS = ("none", "ensemble", "mcdropout", "swag", "swagdiag")
COMBINATIONS = tuple(f"{au}-{eu}" for au in AU_METHODS for eu in EU_METHODS)

# --------------------------------------------------------------------------- member graphs

#: One tensor of the member signature: ``(dtype, dims)``. A ``str`` dimension
#: is symbolic: ``B`` batch, ``H``/``W`` tile size (dynamic), ``C`` channels,
#: ``K`` classes and ``S`` samples (fixed per bundle).
TensorSpec = tuple[str, tuple[int | str, ...]]

#: Inputs of every member graph, in order.
#: image ``[B, C, H, W]`` float32, normalised; seed ``[B]`` the run seed;
#: offset ``[B, 3]`` ``(z, y0, x0)`` of each tile; valid ``[B, 2]`` unpadded
#: ``(rows, cols)`` of each tile.
MEMBER_INPUT_SPEC: dict[str, TensorSpec] = {
    "image": ("float32", ("B", "C", "H", "W")),
    "seed": ("int64", ("B",)),
    "offset": ("int64", ("B", 3)),
    "valid": ("int64", ("B", 2)),
}

#: Outputs of every member graph, in order.
#: mean ``[B, K, H, W]`` p̄ of the member; sample_entropy ``[B, H, W]`` mean
#: per-sample entropy (nats); sample_counts ``[B, S, K]`` per-sample argmax
#: voxel counts in the valid region; sample_labels ``[B, S, H, W]`` per-sample
#: argmax labels (the largest output; runtimes skip it unless asked).
MEMBER_OUTPUT_SPEC: dict[str, TensorSpec] = {
    "mean": ("float32", ("B", "K", "H", "W")),
    "sample_entropy": ("float32", ("B", "H", "W")),
    "sample_counts": ("float32", ("B", "S", "K")),
    "sample_labels": ("uint8", ("B", "S", "H", "W")),
}

#: The volumetric form (``input.dims`` 3): image ``[B, C, D, H, W]``; offset
#: ``[B, 3]`` the global ``(z, y, x)`` of each window's start; valid ``[B, 3]``
#: its unpadded ``(depth, rows, cols)``; outputs gain a ``D`` axis.
MEMBER_INPUT_SPEC_3D: dict[str, TensorSpec] = {
    "image": ("float32", ("B", "C", "D", "H", "W")),
    "seed": ("int64", ("B",)),
    "offset": ("int64", ("B", 3)),
    "valid": ("int64", ("B", 3)),
}
MEMBER_OUTPUT_SPEC_3D: dict[str, TensorSpec] = {
    "mean": ("float32", ("B", "K", "D", "H", "W")),
    "sample_entropy": ("float32", ("B", "D", "H", "W")),
    "sample_counts": ("float32", ("B", "S", "K")),
    "sample_labels": ("uint8", ("B", "S", "D", "H", "W")),
}

MEMBER_INPUTS: tuple[str, ...] = tuple(MEMBER_INPUT_SPEC)
MEMBER_OUTPUTS: tuple[str, ...] = tuple(MEMBER_OUTPUT_SPEC)
#: Outputs a member graph may have besides the contract's: ``logits [B, K, *sp]``
#: float32 before the softmax (nnU-Net members), for blending windows as nnU-Net.
OPTIONAL_MEMBER_OUTPUTS: tuple[str, ...] = ("logits",)


#: Outputs of the server-side reduction (``uqserve repo --reduce server``), in order:
#: the members' sums. ``M`` members; ``*`` the spatial axes (``H, W`` or ``D, H, W``).
#: mean_sum Σ_m p̄_m; entropy_sum Σ_m H[p̄_m] (nats); sample_entropy_sum Σ_m of the mean
#: per-sample entropies; foreground: any member's argmax is not background;
#: sample_counts every member's per-sample class counts.
REDUCED_OUTPUT_SPEC: dict[str, TensorSpec] = {
    "mean_sum": ("float32", ("B", "K", "*")),
    "entropy_sum": ("float32", ("B", "*")),
    "sample_entropy_sum": ("float32", ("B", "*")),
    "foreground": ("bool", ("B", "*")),
    "sample_counts": ("float32", ("B", "M", "S", "K")),
}


def reduced_outputs(
    sizes: dict[str, int | str], spatial: tuple[int | str, ...]
) -> list[tuple[str, str, tuple[int | str, ...]]]:
    """``(name, dtype, shape)`` of each reduced output: the symbols of
    :data:`REDUCED_OUTPUT_SPEC` replaced by ``sizes`` (``B``, ``M``, ``S``, ``K``)
    and ``*`` by the ``spatial`` axes."""
    return [
        (name, dtype, tuple(a for d in dims for a in (spatial if d == "*" else (sizes[str(d)],))))
        for name, (dtype, dims) in REDUCED_OUTPUT_SPEC.items()
    ]


def member_specs(dims: int) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """``(inputs, outputs)`` of the member signature for ``dims`` 2 (slices) or 3 (volumes)."""
    if dims == 2:
        return MEMBER_INPUT_SPEC, MEMBER_OUTPUT_SPEC
    if dims == 3:
        return MEMBER_INPUT_SPEC_3D, MEMBER_OUTPUT_SPEC_3D
    raise UsageError(f"dims must be 2 or 3, got {dims}")


# --------------------------------------------------------------------------- aggregators

#: Image-level aggregators of an uncertainty map, in tie-break order: where two
#: score the same, the earlier wins (``border``, the paper's, first).
AGGREGATORS: tuple[str, ...] = ("border", "mean", "patch", "threshold", "foreground")
#: The paper's aggregator, and the default of a bundle not yet calibrated.
DEFAULT_AGGREGATOR = "border"

# --------------------------------------------------------------------------- data

#: The four corruptions of the paper, in its order (all shifts: ``uqserve.data.SHIFTS``).
PAPER_SHIFTS: tuple[str, ...] = ("noise", "blur", "contrast", "jpeg")

# --------------------------------------------------------------------------- classes


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """Class names when none are given: ``background`` first, then ``lesion``.

    Two classes: ``("background", "lesion")``; more: ``lesion_1 ... lesion_{K-1}``.
    """
    if num_classes < 2:
        raise UsageError(f"num_classes must be >= 2 (background first), got {num_classes}")
    if num_classes == 2:
        return ("background", "lesion")
    return ("background", *(f"lesion_{i}" for i in range(1, num_classes)))
