"""The predict pipeline on real tiny bundles and real NIfTI/DICOM files (Python API)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest

import uqserve
from tests.conftest import SCAN_AFFINE, blob_volume, write_nifti
from uqserve.bundle import Normalization, load_bundle
from uqserve.prediction import OUTPUT_FILES, PredictError, predict, predict_volume
from uqserve.runtime import open_runtime
from uqserve.uncertainty import entropy
from uqserve.volumes import OutputError, Volume, VolumeError, read_nifti

MAPS = ("seg", "prob", "tu", "au", "eu", "au_sample", "au_latent", "sample_counts")


def _volume(shape: tuple[int, int, int] = (40, 36, 5), seed: int = 0) -> Volume:
    return Volume(data=blob_volume(shape, seed), affine=SCAN_AFFINE, source="v")


def test_maps_match_reference_formulas(tiny_bundle: Path) -> None:
    """Against a naive loop: whole-slice sessions, TU = H[p̄], AU = mean_m H[p̄_m], EU = TU - AU."""
    vol = _volume()
    pred = predict_volume(vol, tiny_bundle, batch_size=2)
    bundle = load_bundle(tiny_bundle)
    X, Y, Z = vol.shape
    x = vol.data
    norm = (x - x.mean(dtype=np.float64)) / x.std(dtype=np.float64)
    img = np.pad(np.transpose(norm, (2, 0, 1)), ((0, 0), (0, 0), (0, 4)), mode="reflect")
    feeds = {
        "image": img[:, None].astype(np.float32),
        "seed": np.zeros(Z, np.int64),
        "offset": np.stack([np.arange(Z), np.zeros(Z), np.zeros(Z)], 1).astype(np.int64),
        "valid": np.tile([X, Y], (Z, 1)).astype(np.int64),
    }
    means, ents = [], []
    for m in range(2):
        sess = ort.InferenceSession(str(bundle.member_path(m)), providers=["CPUExecutionProvider"])
        mean, ent = sess.run(["mean", "sample_entropy"], feeds)
        means.append(np.transpose(mean[..., :X, :Y], (1, 2, 3, 0)).astype(np.float64))
        ents.append(np.transpose(ent[..., :X, :Y], (1, 2, 0)).astype(np.float64))
    pbar = np.mean(means, axis=0)
    tu = entropy(pbar, axis=0)
    au = np.mean([entropy(p, axis=0) for p in means], axis=0)
    np.testing.assert_allclose(pred.prob, pbar, atol=2e-5)
    np.testing.assert_allclose(pred.tu, tu, atol=1e-4)
    np.testing.assert_allclose(pred.au, au, atol=1e-4)
    np.testing.assert_allclose(pred.eu, np.maximum(tu - au, 0), atol=1e-4)
    np.testing.assert_allclose(pred.au_sample, np.mean(ents, axis=0), atol=1e-4)
    # The decomposition identities, and the dtypes/shapes of the contract.
    np.testing.assert_allclose(pred.tu, pred.au + pred.eu, atol=1e-5)
    np.testing.assert_allclose(pred.au, pred.au_sample + pred.au_latent, atol=1e-5)
    for key in ("tu", "au", "eu", "au_sample", "au_latent"):
        a = getattr(pred, key)
        assert a.shape == vol.shape and a.dtype == np.float32
        assert a.min() >= 0 and a.max() <= np.log(2) + 1e-5
    assert pred.eu.max() > 0 and pred.au_latent.max() > 0  # M > 1 and S > 1 exercised
    assert pred.seg.dtype == np.uint8
    np.testing.assert_array_equal(pred.seg, np.argmax(pred.prob, axis=0))
    assert pred.seg[20, 18, 2] == 1 and pred.seg[0, 0, 2] == 0  # the blob is found


def test_same_seed_bit_identical_for_any_batch_size(tiny_bundle: Path) -> None:
    vol = _volume((33, 29, 7))
    runtime = open_runtime(tiny_bundle, device="cpu")
    ref = predict_volume(vol, runtime=runtime, seed=3, batch_size=1)
    for bs in (2, 3, 7, 16):
        other = predict_volume(vol, runtime=runtime, seed=3, batch_size=bs)
        for key in MAPS:
            np.testing.assert_array_equal(getattr(other, key), getattr(ref, key), err_msg=key)
    different = predict_volume(vol, runtime=runtime, seed=4, batch_size=1)
    assert not np.array_equal(different.au_sample, ref.au_sample)
    assert not np.array_equal(different.sample_counts, ref.sample_counts)
    assert different.report["seed"] == 4 and ref.report["seed"] == 3
    # Default seed: the bundle's.
    assert predict_volume(vol, runtime=runtime).report["seed"] == 0


def test_samples_counts_and_volume_distribution(tiny_bundle: Path) -> None:
    vol = _volume()
    pred = predict_volume(vol, tiny_bundle, want_samples=True)
    assert pred.sample_labels is not None
    assert pred.sample_labels.shape == (2, 3, *vol.shape)
    counts = np.stack([(pred.sample_labels == k).sum(axis=(2, 3, 4)) for k in range(2)], -1)
    np.testing.assert_array_equal(pred.sample_counts, counts)
    np.testing.assert_array_equal(pred.sample_counts.sum(axis=-1), np.prod(vol.shape))
    vols = pred.report["volumes"]["lesion"]
    ml = pred.sample_counts[..., 1].ravel() * vol.voxel_volume_ml
    assert vols["n_samples"] == 6
    assert vols["mean_ml"] == pytest.approx(ml.mean())
    assert vols["std_ml"] == pytest.approx(ml.std(ddof=1)) and vols["std_ml"] > 0
    assert vols["ci95_ml"][0] <= vols["mean_ml"] <= vols["ci95_ml"][1]


def test_through_plane_axis_not_last(tiny_bundle: Path) -> None:
    """A volume stored [Z, X, Y] with the coarse spacing first is sliced along axis 0."""
    vol = _volume((24, 20, 4))
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = 3.0, 0.8, 0.8
    moved = Volume(data=np.ascontiguousarray(np.moveaxis(vol.data, 2, 0)), affine=aff,
                   source="m", slice_axis=0)  # fmt: skip
    a = predict_volume(vol, tiny_bundle, seed=1)
    b = predict_volume(moved, tiny_bundle, seed=1)
    assert b.tu.shape == (4, 24, 20) and b.prob.shape == (2, 4, 24, 20)
    for key in ("seg", "tu", "au", "eu"):
        np.testing.assert_array_equal(np.moveaxis(getattr(b, key), 0, 2), getattr(a, key))
    assert b.report["scan"]["slice_axis"] == 0


@pytest.mark.parametrize("axis", [0, 1])
def test_one_slice_stored_on_any_axis_gives_the_same_maps(
    tiny_bundle: Path, tmp_path: Path, axis: int
) -> None:
    """One 30 x 26 slice stored [X, Y, 1], [1, X, Y] or [X, 1, Y] (files, isotropic): same maps."""
    data = blob_volume((30, 26, 1), seed=3)
    iso = np.diag([0.7, 0.7, 0.7, 1.0])
    flat = read_nifti(write_nifti(tmp_path / "flat.nii.gz", data, iso))
    moved_data = np.ascontiguousarray(np.moveaxis(data, 2, axis))
    moved = read_nifti(write_nifti(tmp_path / "moved.nii.gz", moved_data, iso))
    assert moved.slice_axis == axis
    a = predict_volume(flat, tiny_bundle, seed=2)
    b = predict_volume(moved, tiny_bundle, seed=2)
    for key in ("seg", "tu", "au", "eu"):
        np.testing.assert_array_equal(np.moveaxis(getattr(b, key), axis, 2), getattr(a, key))


def test_softmax_multiclass_and_single_member(make_bundle: Callable[..., Path]) -> None:
    vol = _volume()
    soft = predict_volume(vol, make_bundle("s", au="softmax", num_samples=1, num_classes=3))
    assert soft.prob.shape == (3, *vol.shape)
    np.testing.assert_allclose(soft.prob.sum(axis=0), 1.0, atol=1e-5)
    assert np.all(soft.au_latent == 0)  # S = 1: no sample disagreement
    assert soft.report["volumes"].keys() == {"class1", "class2"}
    assert soft.report["volumes"]["class1"]["std_ml"] >= 0
    one = predict_volume(vol, make_bundle("n", eu="none", num_members=1, num_samples=4))
    assert np.all(one.eu == 0) and one.report["ood"]["flag"] is None
    assert any("no epistemic method" in w for w in one.report["warnings"])


def test_fixed_normalization_with_clip(make_bundle: Callable[..., Path]) -> None:
    norm = Normalization(scheme="fixed", mean=250.0, std=150.0, clip=(0.0, 400.0))
    folder = make_bundle("f", normalization=norm)
    vol = _volume()
    pred = predict_volume(vol, folder)
    # Equivalent to giving the pre-clipped volume: clipping happens before the shift.
    clipped = Volume(data=np.clip(vol.data, 0.0, 400.0), affine=SCAN_AFFINE, source="c")
    np.testing.assert_array_equal(predict_volume(clipped, folder).tu, pred.tu)
    assert pred.seg[20, 18, 2] == 1 and pred.seg[0, 0, 2] == 0


def test_nonfinite_policy(tiny_bundle: Path) -> None:
    vol = _volume()
    vol.data[0, :, :] = np.nan
    vol.data[1, 0, 0] = np.inf
    pred = predict_volume(vol, tiny_bundle)
    n = 36 * 5 + 1
    assert pred.report["scan"]["nonfinite_voxels"] == n
    assert any(f"{n} non-finite voxels" in w for w in pred.report["warnings"])
    assert np.all(np.isfinite(pred.tu))
    with pytest.raises(VolumeError, match="every voxel is NaN"):
        predict_volume(
            Volume(np.full((8, 8, 2), np.nan, np.float32), SCAN_AFFINE, "n"), tiny_bundle
        )


def test_options_validated(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="batch_size"):
        predict_volume(_volume(), tiny_bundle, batch_size=0)
    with pytest.raises(PredictError, match="seed"):
        predict_volume(_volume(), tiny_bundle, seed=-1)
    with pytest.raises(PredictError, match="on_error"):
        predict(scan, tmp_path / "o", tiny_bundle, on_error="ignore")
    with pytest.raises(VolumeError, match=r"\[X, Y, Z\]"):
        predict_volume(Volume(np.zeros((4, 4), np.float32), SCAN_AFFINE, "2d"), tiny_bundle)


def test_predict_writes_outputs(tiny_bundle: Path, tmp_path: Path) -> None:
    scan = write_nifti(tmp_path / "case1.nii.gz", blob_volume((40, 36, 5)), nifti2=True)
    [res] = uqserve.predict(scan, tmp_path / "out", tiny_bundle, seed=2, png=True)
    assert res.ok and res.out_dir == tmp_path / "out" / "case1"
    files = sorted(p.name for p in res.out_dir.iterdir())
    assert files == sorted([*OUTPUT_FILES, "preview.png"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case1"]  # no temp left
    ref = nib.load(str(scan))
    maps = {}
    for name, dtype in [("seg", np.uint8), ("prob", np.float32), ("tu", np.float32),
                        ("au", np.float32), ("eu", np.float32)]:  # fmt: skip
        img = nib.load(str(res.out_dir / f"{name}.nii.gz"))
        assert isinstance(img, nib.Nifti2Image)
        assert img.get_data_dtype() == dtype and img.shape == (40, 36, 5)
        np.testing.assert_allclose(img.affine, ref.affine)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
        maps[name] = np.asanyarray(img.dataobj)
    np.testing.assert_allclose(maps["tu"], maps["au"] + maps["eu"], atol=1e-5)
    assert set(np.unique(maps["seg"])) <= {0, 1}
    assert 0 <= maps["prob"].min() and maps["prob"].max() <= 1
    np.testing.assert_array_equal(maps["seg"], (maps["prob"] > 0.5).astype(np.uint8))
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report == json.loads(json.dumps(res.report))
    assert report["scan"]["name"] == "case1.nii.gz" and report["scan"]["shape"] == [40, 36, 5]
    import hashlib

    assert report["scan"]["sha256"] == hashlib.sha256(scan.read_bytes()).hexdigest()
    assert report["bundle"]["members"] == 2 and report["bundle"]["samples"] == 3
    assert report["bundle"]["manifest_sha256"] == load_bundle(tiny_bundle).manifest_sha256
    assert report["seed"] == 2 and report["runtime"] == {"name": "embedded", "device": "cpu"}
    assert set(report["scores"]) == {"aggregator", "tu", "au", "eu", "au_sample", "au_latent"}
    assert report["scores"]["tu"] == pytest.approx(float(maps["tu"].mean()), rel=1e-4)  # 'mean'
    assert set(report["ood"]) >= {"score", "threshold", "flag", "percentile"}
    assert report["ood"]["flag"] == (report["ood"]["score"] > 0.05)
    assert report["entanglement"]["bundle"] == {"delta": 0.1, "note": "tiny test bundle"}
    assert set(report["volumes"]["lesion"]) >= {"mean_ml", "std_ml", "ci95_ml"}
    assert report["timings"]["total_s"] > 0 and report["uqserve_version"]
    from PIL import Image

    with Image.open(res.out_dir / "preview.png") as im:
        assert im.format == "PNG" and im.width > 500


def test_predict_4d_and_2d_inputs(tiny_bundle: Path, tmp_path: Path) -> None:
    series = np.stack([blob_volume((24, 20, 3), seed=s) for s in range(2)], axis=-1)
    p4 = write_nifti(tmp_path / "four.nii", series)
    with pytest.raises(VolumeError, match="`volume_index"):
        predict(p4, tmp_path / "o", tiny_bundle)
    [res] = predict(p4, tmp_path / "o", tiny_bundle, volume_index=1)
    assert res.report is not None and res.report["scan"]["volume_index"] == 1
    assert nib.load(str(res.out_dir / "tu.nii.gz")).shape == (24, 20, 3)
    p2 = write_nifti(tmp_path / "flat.nii.gz", blob_volume((30, 26, 1))[:, :, 0])
    [res2] = predict(p2, tmp_path / "o", tiny_bundle)
    assert nib.load(str(res2.out_dir / "seg.nii.gz")).shape == (30, 26)


def test_predict_skips_bad_scans_and_never_leaves_partial_output(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    good = write_nifti(tmp_path / "in" / "good.nii.gz", blob_volume()) if (
        tmp_path / "in").mkdir() is None else None  # fmt: skip
    assert good is not None
    bad = tmp_path / "in" / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:300])
    nan = write_nifti(tmp_path / "in" / "nan.nii.gz", np.full((8, 8, 2), np.nan, np.float32))
    results = predict(tmp_path / "in", tmp_path / "out", tiny_bundle, on_error="skip")
    by_name = {r.name: r for r in results}
    assert set(by_name) == {"good", "bad", "nan"}
    assert by_name["good"].ok
    assert "bad.nii.gz" in (by_name["bad"].error or "")
    assert "every voxel is NaN" in (by_name["nan"].error or "")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good"]
    with pytest.raises(VolumeError, match=r"nan\.nii\.gz"):
        predict(nan, tmp_path / "out", tiny_bundle)
    # Existing results are kept unless overwrite.
    with pytest.raises(OutputError, match="`overwrite=True`"):
        predict(good, tmp_path / "out", tiny_bundle)
    before = (tmp_path / "out" / "good" / "report.json").read_text()
    [again] = predict(good, tmp_path / "out", tiny_bundle, overwrite=True, seed=9)
    assert again.ok and (tmp_path / "out" / "good" / "report.json").read_text() != before
    # An output folder that cannot be created.
    (tmp_path / "blocker").write_text("")
    [res] = predict(good, tmp_path / "blocker" / "x", tiny_bundle, on_error="skip")
    assert "cannot create the output folder" in (res.error or "")


def test_predict_dicom_series(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tests.dicom_peers import phantom, write_ct_series

    syn = write_ct_series(tmp_path / "ct", phantom((32, 28, 4), seed=1), spacing=(0.8, 0.7, 2.5))
    [res] = predict(tmp_path / "ct", tmp_path / "out", tiny_bundle)
    assert res.ok and res.name == "ct"
    img = nib.load(str(res.out_dir / "seg.nii.gz"))
    assert img.shape == (32, 28, 4)
    series_affine = read_dicom_affine(tmp_path / "ct")
    np.testing.assert_allclose(img.affine, series_affine, atol=1e-5)
    assert len(syn.files) == 4


def read_dicom_affine(folder: Path) -> np.ndarray:
    from uqserve.volumes.dicom import read_series

    return read_series(folder).volume.affine


def test_read_nifti_roundtrip_of_example() -> None:
    """The committed example scan is readable and shaped as documented."""
    example = Path(__file__).resolve().parents[1] / "examples" / "example.nii.gz"
    vol = read_nifti(example)
    assert vol.shape == (128, 128, 24) and vol.slice_axis == 2
    assert vol.spacing == pytest.approx((0.8, 0.8, 3.0))


def test_pipelined_scans_equal_sequential_in_order_and_bounded(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Writing scan i while scan i + 1 predicts changes no byte, keeps the order, and
    holds at most one uncommitted scan when a scan is reported."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        write_nifti(folder / f"s{i}.nii.gz", blob_volume((24, 20, 3), seed=i))
    (folder / "s2.nii.gz").write_bytes(b"not a nifti")  # a bad scan in the middle
    seen: list[tuple[str, int, bool]] = []

    def on_scan(res: uqserve.prediction.ScanResult) -> None:
        out = tmp_path / "piped"
        uncommitted = [p for p in out.iterdir() if p.name.startswith(".")]
        seen.append((res.name, len(uncommitted), res.ok))

    with open_runtime(tiny_bundle, device="cpu") as rt:
        piped = predict(folder, tmp_path / "piped", runtime=rt, on_error="skip", on_scan=on_scan)
        plain = predict(folder, tmp_path / "plain", runtime=rt, on_error="skip", pipeline=False)
    assert [r.name for r in piped] == [r.name for r in plain] == ["s0", "s1", "s2", "s3"]
    # reported in order; while s0 is reported s1 is predicted, uncommitted (s2 is unreadable)
    assert seen == [("s0", 1, True), ("s1", 0, True), ("s2", 0, False), ("s3", 0, True)]
    assert not piped[2].ok and "s2.nii.gz" in (piped[2].error or "")
    for a, b in zip(piped, plain, strict=True):
        assert a.ok == b.ok
        if not a.ok:
            continue
        for name in OUTPUT_FILES[:-1]:
            x = (tmp_path / "piped" / a.name / name).read_bytes()
            assert x == (tmp_path / "plain" / b.name / name).read_bytes(), name
        ra = json.loads((tmp_path / "piped" / a.name / "report.json").read_text())
        rb = json.loads((tmp_path / "plain" / b.name / "report.json").read_text())
        for r in (ra, rb):
            r.pop("timings")
            r["outputs"].pop("folder")
        assert ra == rb
    assert not [p for p in (tmp_path / "piped").iterdir() if p.name.startswith(".")]


def test_pipelined_error_raises_in_order_and_leaves_nothing(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_nifti(folder / f"s{i}.nii.gz", blob_volume((24, 20, 3), seed=i))
    out = tmp_path / "out"
    (out / "s1").mkdir(parents=True)  # scan 1's results exist: no overwrite
    reported: list[str] = []
    with pytest.raises(OutputError, match="s1: results exist already"):
        predict(folder, out, tiny_bundle, device="cpu", on_scan=lambda r: reported.append(r.name))
    assert reported == ["s0"]  # the scan before the failure was written and reported first
    assert sorted(p.name for p in out.iterdir()) == ["s0", "s1"]
    assert (out / "s0" / "report.json").is_file() and not any((out / "s1").iterdir())
