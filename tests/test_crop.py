"""``input.crop_nonzero``: crop to the nonzero bounding box, predict there, put the maps back.

What nnU-Net does: the box is cut out before normalisation and resampling,
the model sees only the box, and outside it the prediction is background
with probability 1 (here also: no uncertainty). nnU-Net parity of a case that
needs the crop is in tests/test_nnunet_parity.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import test_geometry
from uqserve.bundle import load_bundle, write_manifest
from uqserve.prediction import predict_volume
from uqserve.schemas import validate
from uqserve.volumes import Volume

# test_geometry's module fixture: two seeded 3D folds, 3 x 2.5 x 2.5 mm, RAS, windows.
bundle_3d = test_geometry.bundle_3d

_AFFINE = np.diag([-2.0, 2.0, 4.0, 1.0])
_BOX = (slice(3, 25), slice(5, 27), slice(1, 9))


@pytest.fixture(scope="module")
def cropping(bundle_3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("crop") / "b"
    shutil.copytree(bundle_3d, folder)
    man = load_bundle(folder).manifest
    inp = dataclasses.replace(man.input, crop_nonzero=True)
    write_manifest(folder, dataclasses.replace(man, input=inp))
    return folder


def _framed() -> tuple[Volume, Volume]:
    """A scan with a frame of zeros around ``_BOX``, and the box alone (same positions)."""
    rng = np.random.default_rng(3)
    data = np.zeros((30, 29, 10), np.float32)
    data[_BOX] = rng.normal(50.0, 20.0, data[_BOX].shape) + 1000.0  # no zero inside
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in _BOX]
    box = Volume(np.ascontiguousarray(data[_BOX]), _AFFINE @ shift, "box")
    return Volume(data, _AFFINE, "framed"), box


def test_the_box_is_predicted_alone_and_the_rest_is_background(
    cropping: Path, bundle_3d: Path
) -> None:
    framed, box = _framed()
    a = predict_volume(framed, cropping, seed=0)
    alone = predict_volume(box, bundle_3d, seed=0)  # the model sees exactly the box
    for name in ("prob", "tu", "au", "eu", "seg"):
        got = getattr(a, name)
        assert got.shape[-3:] == framed.shape
        np.testing.assert_array_equal(got[(..., *_BOX)], getattr(alone, name), err_msg=name)
    outside = np.ones(framed.shape, bool)
    outside[_BOX] = False
    assert (a.prob[0][outside] == 1.0).all() and not a.prob[1][outside].any()
    assert not a.seg[outside].any()
    assert not (a.tu[outside].any() or a.au[outside].any() or a.eu[outside].any())
    assert (a.eu[_BOX] > 0).any()
    crop = a.report["geometry"]["crop"]
    assert crop == {"start": [3, 5, 1], "stop": [25, 27, 9]}
    validate(a.report, "report")
    # Without the flag the frame is part of the image (z-score over it, other windows).
    b = predict_volume(framed, bundle_3d, seed=0)
    assert "crop" not in b.report["geometry"]
    assert not np.array_equal(b.prob[(..., *_BOX)], alone.prob)


def test_nothing_to_crop_is_the_plain_pipeline(cropping: Path, bundle_3d: Path) -> None:
    _, box = _framed()
    a = predict_volume(box, cropping, seed=0)
    b = predict_volume(box, bundle_3d, seed=0)
    assert "crop" not in a.report["geometry"]
    np.testing.assert_array_equal(a.prob, b.prob)
    np.testing.assert_array_equal(a.sample_counts, b.sample_counts)
