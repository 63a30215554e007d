"""preview.png: radiological orientation on real scans, per-map scales, slice choice, legend."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from tests.real_dicom import small_enhanced_mr
from uqserve.prediction import predict
from uqserve.prediction._display import display_frame, nice_ticks, orient, pick_slices
from uqserve.prediction.preview import _LABEL_COLOURS, PANEL, ood_line, viridis_lut
from uqserve.volumes import read_volume
from uqserve.volumes.dicom import read_series

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
EXAMPLE = Path(__file__).parents[1] / "examples" / "example.nii.gz"


def _ct_small() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's CT_small.dcm not available offline")
    return Path(path)


def _screen_world(affine: npt.NDArray[np.float64], shape: tuple[int, int, int]) -> np.ndarray:
    """RAS mm of every screen pixel ``[rows, cols, 3]`` of slice 0 as the preview shows it."""
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape[:2]), indexing="ij"), -1)
    frame = display_frame(affine, 2)
    screen = orient(idx, frame)  # [rows, cols, 2] voxel (i, j) of each screen pixel
    ijk1 = np.concatenate(
        [screen, np.zeros_like(screen[..., :1]), np.ones_like(screen[..., :1])], -1
    )
    return (ijk1 @ affine.T)[..., :3]


@pytest.mark.parametrize("source", ["anatomical", "ct_small", "example"])
def test_axial_scans_are_shown_radiologically(source: str) -> None:
    path = {"anatomical": ANATOMICAL, "ct_small": _ct_small(), "example": EXAMPLE}[source]
    vol = read_volume(path)
    world = _screen_world(vol.affine, vol.shape)
    right = world[:, 1:] - world[:, :-1]  # one screen column to the right
    down = world[1:] - world[:-1]  # one screen row down
    assert np.all(right[..., 0] < 0)  # towards the patient's left: their right is on our left
    assert np.all(down[..., 1] < 0)  # towards posterior: anterior is up
    assert display_frame(vol.affine, 2).letters == ("A", "P", "R", "L")


def test_sagittal_enhanced_mr_has_anterior_left_and_superior_up() -> None:
    vol = read_series([small_enhanced_mr()], name="sag").volume
    world = _screen_world(vol.affine, vol.shape)
    assert np.all((world[:, 1:] - world[:, :-1])[..., 1] < 0)  # right = posterior
    assert np.all((world[1:] - world[:-1])[..., 2] < 0)  # down = inferior
    frame = display_frame(vol.affine, 2)
    assert frame.plane == "sagittal" and frame.letters == ("S", "I", "A", "P")


def test_other_slice_axes_and_planes() -> None:
    """Identity affine: slicing along x gives sagittal, along y coronal, both radiological."""
    eye = np.eye(4)
    assert display_frame(eye, 0).letters == ("S", "I", "A", "P")
    assert display_frame(eye, 1).letters == ("S", "I", "R", "L")
    assert display_frame(np.zeros((4, 4)), 2).mm == (1.0, 1.0)  # never a zero-sized panel


def test_slices_with_most_foreground_else_most_uncertainty() -> None:
    seg = np.zeros((4, 4, 20), np.uint8)
    for z, n in {3: 2, 4: 9, 5: 8, 11: 5, 17: 4}.items():
        seg[:, :, z].flat[:n] = 1
    tu = np.zeros((4, 4, 20), np.float32)
    assert pick_slices(seg, tu, 3) == ([4, 11, 17], "most foreground")
    tu[:, :, 7] = 1.0
    tu[:, :, 2] = 0.5
    zs, why = pick_slices(np.zeros_like(seg), tu, 2)
    assert zs == [2, 7] and "uncertainty" in why


def test_ticks_are_round_and_cover_the_top() -> None:
    assert nice_ticks(0.6931) == (0.8, [0.0, 0.2, 0.4, 0.6, 0.8])
    top, ticks = nice_ticks(0.00213)
    assert top == pytest.approx(0.003) and ticks[1] == pytest.approx(0.001)
    assert nice_ticks(0.0) == (1.0, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_ood_title_line() -> None:
    ood = {"score": 0.0739, "threshold": 0.00359, "flag": True, "percentile": 100.0}
    assert ood_line(ood) == (
        "OOD: OUT OF DISTRIBUTION (EU score 0.0739 nats vs threshold 0.00359, "
        "validation percentile 100)"
    )
    assert ood_line({"score": 0.002, "threshold": None, "flag": None}).startswith(
        "OOD: not calibrated"
    )


@pytest.mark.slow
def test_preview_png_of_the_example(tmp_path: Path) -> None:
    """EU gets its own scale (not TU's): its panels use the bright end of viridis too."""
    [res] = predict(EXAMPLE, tmp_path / "out", png=True, seed=0)
    with Image.open(res.out_dir / "preview.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    pad, header = 6, 46
    assert rgb.shape[1] == pad + 5 * (PANEL + pad)
    lut = viridis_lut().astype(np.int64)

    def viridis_index(panel: np.ndarray) -> np.ndarray:
        d = ((panel[..., None, :].astype(np.int64) - lut[None, None]) ** 2).sum(-1)
        return np.argmin(d, axis=-1)

    rows = header + 3 * (PANEL + pad)
    for column in (2, 3, 4):  # TU, AU, EU; on TU's 0..ln 2 scale EU stayed below 60
        x = pad + column * (PANEL + pad)
        panel = rgb[header + 10 : rows - 10, x + 10 : x + PANEL - 10]
        assert viridis_index(panel).max() > 200, column
    # The legend's colour sits under the overlay column.
    x = pad + (PANEL + pad)
    footer = rgb[-50:, x : x + 12]
    assert (footer == _LABEL_COLOURS[0]).all(axis=-1).any()
