"""Synthetic data, OOD shifts, users' data folders and normalisation statistics."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from uqserve.data import (
    SHIFTS,
    FolderError,
    apply_shift,
    clahe,
    dataset_seeds,
    load_folder,
    make_dataset,
    make_slice,
    make_volume,
    normalization_stats,
    write_example_folder,
    write_nifti,
)
from uqserve.volumes import Volume


def _disagreement(ann: np.ndarray) -> float:
    """Mean pairwise 1 - IoU of the foreground between annotators ([A, ...])."""
    fg = ann > 0
    vals = []
    for i in range(len(fg)):
        for j in range(i + 1, len(fg)):
            union = (fg[i] | fg[j]).sum()
            vals.append(0.0 if union == 0 else 1.0 - (fg[i] & fg[j]).sum() / union)
    return float(np.mean(vals))


# --- synthetic slices -------------------------------------------------------------


def test_slice_shapes_ranges_and_determinism() -> None:
    a = make_slice(7, size=(96, 80))
    b = make_slice(7, size=(96, 80))
    c = make_slice(8, size=(96, 80))
    assert a.image.shape == (1, 96, 80) and a.image.dtype == np.float32
    assert a.annotations.shape == (4, 96, 80) and a.annotations.dtype == np.uint8
    assert a.truth.shape == (96, 80) and a.soft.shape == (96, 80)
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    assert set(np.unique(a.annotations)) <= {0, 1}
    assert a.truth.any(), "every slice has at least one lesion"
    for field in ("image", "annotations", "truth", "soft"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, c.image)


def test_lesions_are_brighter_and_truth_matches_soft_map() -> None:
    it = make_slice(3)
    np.testing.assert_array_equal(it.truth > 0, it.soft >= 0.5)
    # Lesions (K = 2) add intensity: lesion pixels are brighter than the body around them.
    ring = ndimage.binary_dilation(it.truth > 0, iterations=6) & ~(
        ndimage.binary_dilation(it.truth > 0, iterations=2)
    )
    assert it.image[0][it.truth > 0].mean() > it.image[0][ring].mean() + 0.03


def test_three_classes_two_lesion_types() -> None:
    ds = make_dataset(16, seed=1, size=64, num_classes=3)
    assert set(np.unique(ds.annotations)) == {0, 1, 2}
    assert ds.num_classes == 3
    # Type 1 is brighter, type 2 darker than the body.
    img = ds.images[:, 0]
    body = (img > 0.15) & (ds.truth == 0)
    assert img[ds.truth == 1].mean() > img[body].mean() > img[ds.truth == 2].mean()


def test_ambiguity_controls_annotator_spread_only() -> None:
    low = make_dataset(24, seed=5, size=64, ambiguity="low")
    high = make_dataset(24, seed=5, size=64, ambiguity="high")
    # Same seed, same images: the ambiguity level changes only the annotators.
    np.testing.assert_array_equal(low.images, high.images)
    np.testing.assert_array_equal(low.truth, high.truth)
    d_low = np.mean([_disagreement(a) for a in low.annotations])
    d_high = np.mean([_disagreement(a) for a in high.annotations])
    assert d_high > 1.5 * d_low > 0
    # Annotators keep a style: annotator 0 draws tightest, the last one most generously.
    area = (high.annotations > 0).sum(axis=(0, 2, 3))
    assert area[0] < area[-1]
    assert list(area) == sorted(area)


def test_dataset_items_equal_slices_and_prefix_stable() -> None:
    ds = make_dataset(5, seed=11, size=48, ambiguity="high", num_annotators=3)
    assert ds.images.shape == (5, 1, 48, 48) and ds.annotations.shape == (5, 3, 48, 48)
    assert len(ds) == 5
    np.testing.assert_array_equal(ds.seeds, dataset_seeds(5, 11))
    one = make_slice(int(ds.seeds[3]), size=48, ambiguity="high", num_annotators=3)
    np.testing.assert_array_equal(ds.images[3], one.image)
    np.testing.assert_array_equal(ds.annotations[3], one.annotations)
    longer = make_dataset(6, seed=11, size=48, ambiguity="high", num_annotators=3)
    np.testing.assert_array_equal(longer.images[:5], ds.images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ambiguity": "medium"}, "ambiguity"),
        ({"num_classes": 5}, "num_classes"),
        ({"num_annotators": 0}, "num_annotators"),
        ({"size": (4, 4)}, "size"),
    ],
)
def test_slice_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_slice(0, **kwargs)


# --- synthetic volumes ------------------------------------------------------------


def test_volume_geometry_and_coherent_lesions() -> None:
    sv = make_volume(2, shape=(64, 64, 20), spacing=(0.8, 0.8, 3.0))
    vol = sv.volume
    assert isinstance(vol, Volume)
    assert vol.data.shape == (64, 64, 20) and vol.data.dtype == np.float32
    assert sv.annotations.shape == (4, 64, 64, 20) and sv.truth.shape == (64, 64, 20)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 3.0))
    assert np.all(np.diag(vol.affine)[:3] > 0), "RAS+: axes point right, anterior, superior"
    assert np.abs(vol.affine[:3, 3]).min() > 1.0, "origin is not at zero"
    assert vol.slice_axis == 2
    np.testing.assert_allclose(vol.voxel_volume_ml, 0.8 * 0.8 * 3.0 / 1000)
    # Lesions are 3D blobs: most lesion voxels have lesion in a neighbouring slice,
    # far more than if the slices were shuffled.
    fg = sv.truth > 0

    def continued(m: np.ndarray) -> float:
        nb = np.zeros_like(m)
        nb[..., 1:] |= m[..., :-1]
        nb[..., :-1] |= m[..., 1:]
        return float((m & nb).sum() / m.sum())

    shuffled = fg[..., np.random.default_rng(0).permutation(fg.shape[2])]
    assert continued(fg) > 0.7
    assert continued(fg) > 2 * continued(shuffled)
    # ... and most 3D components span several slices.
    labels, n = ndimage.label(fg)
    spans = [np.ptp(np.nonzero(labels == i)[2]) + 1 for i in range(1, n + 1)]
    assert np.median(spans) >= 2


def test_volume_slices_resemble_2d_slices() -> None:
    sv = make_volume(4, shape=(64, 64, 16))
    ds = make_dataset(16, seed=4, size=64)
    body_v = sv.volume.data[sv.volume.data > 0.15]
    body_s = ds.images[ds.images > 0.15]
    assert abs(float(body_v.mean()) - float(body_s.mean())) < 0.05


# --- shifts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_slice(1, size=96).image


@pytest.mark.parametrize("kind", SHIFTS)
def test_shift_shape_determinism_and_severity(image: np.ndarray, kind: str) -> None:
    mild = apply_shift(image, kind, 0.0, seed=3)
    strong = apply_shift(image, kind, 1.0, seed=3)
    again = apply_shift(image, kind, 1.0, seed=3)
    assert mild.shape == image.shape and mild.dtype == np.float32
    np.testing.assert_array_equal(strong, again)
    d_mild = float(np.abs(mild - image).mean())
    d_strong = float(np.abs(strong - image).mean())
    assert 0 < d_mild < d_strong, (d_mild, d_strong)
    # 2D arrays without a channel axis work too.
    np.testing.assert_allclose(apply_shift(image[0], kind, 1.0, seed=3), strong[0], atol=1e-6)


def test_noise_std_is_a_fraction_of_the_intensity_range(image: np.ndarray) -> None:
    lo, hi = np.percentile(image, [0.5, 99.5])
    for sev, frac in [(0.0, 0.1), (0.5, 0.3), (1.0, 0.5)]:
        diff = apply_shift(image, "noise", sev, seed=0) - image
        assert float(diff.std()) == pytest.approx(frac * (hi - lo), rel=0.05)


def test_inversion_reverses_order(image: np.ndarray) -> None:
    out = apply_shift(image, "inversion", 1.0)
    r = np.corrcoef(out.ravel(), image.ravel())[0, 1]
    assert r < -0.99


def test_clahe_keeps_flat_histograms_and_raises_local_contrast() -> None:
    rng = np.random.default_rng(0)
    # Already equalised (uniform histogram in every tile): CLAHE changes little.
    flat = rng.uniform(size=(128, 128))
    assert np.abs(clahe(flat, clip_limit=5.0) - flat).mean() < 0.03
    # Low-contrast image: contrast grows with the clip limit.
    x = ndimage.gaussian_filter(rng.uniform(size=(128, 128)), 4)
    x = (x - x.min()) / (x.max() - x.min()) * 0.3 + 0.35
    stds = [float(clahe(x, clip_limit=c).std()) for c in (1.5, 5.0, 1000.0)]
    assert x.std() < stds[0] < stds[1] < stds[2]
    eq = clahe(x, clip_limit=1000.0)
    assert 0.0 <= eq.min() and eq.max() <= 1.0
    # Local order is kept (monotone per-tile maps, blended between tiles).
    r = np.corrcoef(
        np.argsort(np.argsort(x[:16, :16].ravel())), np.argsort(np.argsort(eq[:16, :16].ravel()))
    )
    assert r[0, 1] > 0.95


def test_jpeg_quality_gives_block_artifacts(image: np.ndarray) -> None:
    out = apply_shift(image, "jpeg", 1.0)[0]
    # Quality 10: the error steps at 8x8 block borders more than inside the blocks.
    err = np.diff(out - image[0], axis=1)
    at_border = np.abs(err[:, 7::8]).mean()
    inside = np.abs(np.delete(err, np.s_[7::8], axis=1)).mean()
    assert at_border > 1.2 * inside


def test_shift_on_volume_keeps_geometry_and_is_coherent() -> None:
    sv = make_volume(0, shape=(64, 64, 12))
    for kind in SHIFTS:
        out = apply_shift(sv.volume, kind, 0.7, seed=1)
        assert isinstance(out, Volume)
        assert out.data.shape == sv.volume.data.shape
        np.testing.assert_array_equal(out.affine, sv.volume.affine)
    # Unseen structures run through consecutive slices: the same added pattern.
    added = apply_shift(sv.volume, "structures", 1.0, seed=2).data - sv.volume.data
    present = [z for z in range(12) if np.abs(added[..., z]).max() > 0.05]
    assert len(present) >= 3
    # Raw arrays: [X, Y, Z] is recognised as a volume (first axis > 4 long).
    arr = apply_shift(sv.volume.data, "bias", 0.5, seed=1)
    np.testing.assert_array_equal(arr, apply_shift(sv.volume, "bias", 0.5, seed=1).data)


def test_shift_bad_arguments(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"unknown shift 'rain'.*noise"):
        apply_shift(image, "rain", 0.5)
    with pytest.raises(ValueError, match="severity"):
        apply_shift(image, "noise", 1.5)
    with pytest.raises(ValueError, match="finite"):
        apply_shift(np.full((1, 8, 8), np.nan), "noise", 0.5)


# --- users' folders ---------------------------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "cases"
    return write_example_folder(root, num_cases=2, seed=3, shape=(32, 32, 6), num_annotators=3)


def _copy(example: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cases"
    shutil.copytree(example, dst)
    return dst


def test_load_folder_roundtrip(example: Path) -> None:
    ds = load_folder(example)
    assert len(ds) == 2 and ds.num_classes == 2
    case = ds[0]
    assert case.name == "case_000"
    assert case.annotators == ("r0", "r1", "r2")
    ref = make_volume(3, shape=(32, 32, 6), num_annotators=3)
    np.testing.assert_allclose(case.image.data, ref.volume.data)
    np.testing.assert_allclose(case.image.affine, ref.volume.affine, atol=1e-5)
    np.testing.assert_array_equal(case.annotations, ref.annotations)
    images, anns = ds.slices()
    assert len(images) == 12 and images[0].shape == (1, 32, 32) and anns[0].shape == (3, 32, 32)
    np.testing.assert_array_equal(images[2][0], ref.volume.data[:, :, 2])
    assert load_folder(example, num_classes=3).num_classes == 3


def test_write_nifti_keeps_affine_and_codes(tmp_path: Path) -> None:
    sv = make_volume(1, shape=(16, 16, 4))
    p = write_nifti(sv.volume, tmp_path / "x.nii.gz")
    img = nib.load(str(p))
    np.testing.assert_allclose(img.affine, sv.volume.affine, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert [q.name for q in tmp_path.iterdir()] == ["x.nii.gz"], "no temp files left"


def test_load_folder_png_2d(tmp_path: Path) -> None:
    it = make_slice(0, size=(40, 48), num_annotators=2)
    case = tmp_path / "d" / "a"
    case.mkdir(parents=True)
    Image.fromarray((it.image[0] * 255).astype(np.uint8)).save(case / "image.png")
    for i, ann in enumerate(it.annotations):
        Image.fromarray(ann).save(case / f"label_{i}.png")
    ds = load_folder(tmp_path / "d")
    c = ds[0]
    assert c.image.data.shape == (48, 40, 1), "PNG rows/cols -> [X = cols, Y = rows, 1]"
    np.testing.assert_array_equal(c.annotations[1, :, :, 0], it.annotations[1].T)


def _label_path(root: Path) -> Path:
    return root / "case_001" / "label_r1.nii.gz"


def test_folder_missing_labels(example: Path, tmp_path: Path) -> None:
    root = _copy(example, tmp_path)
    for p in (root / "case_001").glob("label_*"):
        p.unlink()
    with pytest.raises(FolderError, match=r"case_001: no label_<annotator>\.nii\.gz"):
        load_folder(root)


def test_folder_shape_mismatch(example: Path, tmp_path: Path) -> None:
    root = _copy(example, tmp_path)
    write_nifti(np.zeros((32, 30, 6), np.uint8), _label_path(root))
    with pytest.raises(FolderError, match=r"label_r1\.nii\.gz: shape \(32, 30, 6\) differs"):
        load_folder(root)


def test_folder_non_integer_labels(example: Path, tmp_path: Path) -> None:
    root = _copy(example, tmp_path)
    lab = np.zeros((32, 32, 6), np.float32)
    lab[3, 3, 3] = 0.5
    write_nifti(lab, _label_path(root), affine=load_folder(example)[1].image.affine)
    with pytest.raises(FolderError, match=r"label_r1\.nii\.gz: label map has non-integer values"):
        load_folder(root)


def test_folder_class_beyond_num_classes(example: Path, tmp_path: Path) -> None:
    root = _copy(example, tmp_path)
    lab = np.zeros((32, 32, 6), np.uint8)
    lab[3, 3, 3] = 4
    write_nifti(lab, _label_path(root), affine=load_folder(example)[1].image.affine)
    with pytest.raises(FolderError, match=r"label_r1\.nii\.gz: class id 4 is beyond num_classes=3"):
        load_folder(root, num_classes=3)
    assert load_folder(root).num_classes == 5


def test_folder_other_errors(example: Path, tmp_path: Path) -> None:
    with pytest.raises(FolderError, match="not a folder"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderError, match="no case folders"):
        load_folder(tmp_path / "empty")
    root = _copy(example, tmp_path)
    shutil.copy(_label_path(root), root / "case_000" / "labels_x.nii.gz")
    with pytest.raises(FolderError, match=r"labels_x\.nii\.gz: unexpected file"):
        load_folder(root)
    (root / "case_000" / "labels_x.nii.gz").unlink()
    (root / "case_001" / "image.nii.gz").unlink()
    with pytest.raises(FolderError, match=r"case_001: no image\.nii\.gz"):
        load_folder(root)


# --- normalisation statistics -----------------------------------------------------


def test_normalization_stats() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(100.0, 3.0, size=(4, 1, 16, 16)).astype(np.float32)
    b = rng.normal(90.0, 5.0, size=(3, 1, 8, 8)).astype(np.float32)
    mean, std = normalization_stats(a)
    assert mean == pytest.approx(float(a.astype(np.float64).mean()), rel=1e-9)
    assert std == pytest.approx(float(a.astype(np.float64).std()), rel=1e-6)
    pooled = np.concatenate([a.ravel(), b.ravel()]).astype(np.float64)
    m2, s2 = normalization_stats([a, b])
    assert (m2, s2) == pytest.approx((pooled.mean(), pooled.std()), rel=1e-6)
    with pytest.raises(ValueError, match="constant"):
        normalization_stats(np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="no voxels"):
        normalization_stats([])
