"""The shared contracts: one definition, used everywhere, matched by the Triton python model."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from uqserve import bundle, contracts, data, uncertainty
from uqserve.evaluation import core
from uqserve.models import config as model_config

PYTHON_MODEL = Path(contracts.__file__).parent / "serving" / "python_model.py"


def _module_constants(path: Path) -> dict[str, object]:
    """Top-level ``NAME = ...`` of a file that cannot be imported here; ``np.x`` -> ``"x"``."""

    def value(node: ast.expr) -> object:
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "np":
            return node.attr
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
        return ast.literal_eval(node)

    out: dict[str, object] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = value(node.value)
            except ValueError:
                continue  # not a constant
    return out


def test_triton_python_model_copy_matches_the_contracts() -> None:
    """python_model.py runs inside Triton without uqserve, so it keeps its own names."""
    consts = _module_constants(PYTHON_MODEL)
    assert consts["INPUTS"] == contracts.MEMBER_INPUTS
    assert consts["OUTPUTS"] == contracts.MEMBER_OUTPUTS
    assert consts["DTYPES"] == {n: dt for n, (dt, _) in contracts.MEMBER_INPUT_SPEC.items()}


def test_every_module_uses_the_one_definition() -> None:
    assert uncertainty.AGGREGATORS is contracts.AGGREGATORS
    assert bundle.AGGREGATORS is contracts.AGGREGATORS
    assert core.AGGREGATORS is contracts.AGGREGATORS
    assert core.PAPER_AGGREGATOR == contracts.DEFAULT_AGGREGATOR == contracts.AGGREGATORS[0]
    assert bundle.AU_METHODS is model_config.AU_METHODS is contracts.AU_METHODS
    assert bundle.EU_METHODS is model_config.EU_METHODS is contracts.EU_METHODS
    assert data.PAPER_SHIFTS is contracts.PAPER_SHIFTS
    assert set(contracts.PAPER_SHIFTS) <= set(data.SHIFTS)


def test_member_signature_is_ordered_and_typed() -> None:
    assert contracts.MEMBER_INPUTS == ("image", "seed", "offset", "valid")
    assert contracts.MEMBER_OUTPUTS == ("mean", "sample_entropy", "sample_counts", "sample_labels")
    for dtype, dims in (
        *contracts.MEMBER_INPUT_SPEC.values(),
        *contracts.MEMBER_OUTPUT_SPEC.values(),
    ):
        assert dtype in ("float32", "int64", "uint8") and dims[0] == "B"


def test_runtime_batches_and_outputs_follow_the_member_signature() -> None:
    from dataclasses import fields

    import numpy as np

    from uqserve.runtime.base import Batch, MemberOutputs

    assert tuple(f.name for f in fields(Batch)) == contracts.MEMBER_INPUTS
    # the graph's outputs, in order, plus what the caller's prepare hook made of them
    names = tuple(f.name for f in fields(MemberOutputs))
    assert names == (*contracts.MEMBER_OUTPUTS, *contracts.OPTIONAL_MEMBER_OUTPUTS, "prepared")
    batch = Batch(
        np.zeros((1, 1, 8, 8), np.float32),
        np.zeros(1, np.int64),
        np.zeros((1, 3), np.int64),
        np.full((1, 2), 8, np.int64),
    )
    feeds = batch.feeds()
    assert tuple(feeds) == contracts.MEMBER_INPUTS and feeds["valid"] is batch.valid


def test_default_class_names() -> None:
    assert contracts.default_class_names(2) == ("background", "lesion")
    assert contracts.default_class_names(4) == ("background", "lesion_1", "lesion_2", "lesion_3")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        contracts.default_class_names(1)


def test_contracts_import_neither_numpy_nor_torch() -> None:
    code = (
        "import sys, uqserve.contracts; "
        "print(sorted(m for m in ('numpy', 'torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
