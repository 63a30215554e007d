"""``input.slice_axis``: a 2D bundle slices along the axis it was trained on.

nnU-Net 2d models slice along the plans' axis (``transpose_forward[0]``), not
the scan's thickest one; ``export --nnunet`` pins it (the parity suite checks
the manifest). Here a shipped 2D bundle pinned to axis 0 must give, on a scan
whose thickest axis is the last, the maps of the same scan stored with axis 0
moved last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_geometry import _bundle
from uqserve.bundle import InputSpec
from uqserve.prediction import predict_volume
from uqserve.volumes import Volume


def test_pinned_slice_axis_slices_along_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data = rng.normal(0.0, 1.0, (6, 40, 36)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])  # thickest: the last axis
    pinned = _bundle(tmp_path, "softmax-ensemble", slice_axis=0)
    a = predict_volume(Volume(data, affine, "scan", slice_axis=2), pinned, seed=0)
    assert a.report["scan"]["slice_axis"] == 0
    moved = Volume(np.ascontiguousarray(np.moveaxis(data, 0, 2)), affine, "moved", slice_axis=2)
    b = predict_volume(moved, "softmax-ensemble", seed=0)
    for name in ("prob", "tu", "au", "eu", "seg"):
        want = np.moveaxis(getattr(b, name), -1, -3)
        np.testing.assert_array_equal(getattr(a, name), want, err_msg=name)
    plain = predict_volume(Volume(data, affine, "scan", slice_axis=2), "softmax-ensemble", seed=0)
    assert plain.report["scan"]["slice_axis"] == 2 and not np.array_equal(plain.tu, a.tu)


@pytest.mark.parametrize(
    "inp", [{"slice_axis": 3}, {"dims": 3, "patch": (4, 8, 8), "slice_axis": 0}]
)
def test_slice_axis_is_checked(inp: dict[str, object]) -> None:
    problems = InputSpec(**inp).problems()  # type: ignore[arg-type]
    assert any("input.slice_axis must be 0, 1 or 2 for dims 2" in p for p in problems)
