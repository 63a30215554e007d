"""Geometry: manifest fields, reorientation, resampling, sliding windows, on real scans.

The scan is nibabel's real anatomical MRI (33 x 41 x 25, 2 mm, stored LAS);
the bundles are the shipped, trained ones with their manifests given a
geometry (the member graphs are copied unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from uqserve.bundle import (
    BUNDLES_DIR,
    SCHEMA_VERSION,
    BundleError,
    InputSpec,
    Manifest,
    Normalization,
    Padding,
    load_bundle,
    write_manifest,
)
from uqserve.prediction import Prediction, predict_volume
from uqserve.prediction.intensity import nonzero_mask, normalize_volume
from uqserve.prediction.resample import image_orders, resample, target_shape
from uqserve.prediction.windows import gaussian_weights, starts
from uqserve.schemas import validate
from uqserve.volumes import Volume, read_volume

MRI = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def _bundle(tmp: Path, name: str, **inp: Any) -> Path:
    """A copy of shipped bundle ``name`` whose manifest input has ``inp`` changed."""
    folder = tmp / f"{name}-geo"
    shutil.copytree(BUNDLES_DIR / name, folder)
    man = load_bundle(folder).manifest
    write_manifest(folder, dataclasses.replace(man, input=dataclasses.replace(man.input, **inp)))
    return folder


def _flipped(vol: Volume, axis: int) -> Volume:
    """The same physical image stored with array ``axis`` reversed (affine adjusted)."""
    flip = np.eye(4)
    flip[axis, axis] = -1
    flip[axis, 3] = vol.data.shape[axis] - 1
    return Volume(
        np.ascontiguousarray(np.flip(vol.data, axis)), vol.affine @ flip, vol.source, None,
        vol.slice_axis,
    )  # fmt: skip


def _maps(p: Prediction) -> dict[str, np.ndarray]:
    return {"seg": p.seg, "prob": p.prob, "tu": p.tu, "au": p.au, "eu": p.eu}


# --------------------------------------------------------------------------- manifest


def test_shipped_v1_manifests_migrate_on_load() -> None:
    raw = json.loads((BUNDLES_DIR / "ssn-ensemble" / "manifest.json").read_text())
    assert raw.get("schema_version", 1) == 1 and raw["input"]["spacing"] == [1.0, 1.0]
    man = load_bundle("ssn-ensemble").manifest
    inp = man.input
    assert man.schema_version == SCHEMA_VERSION == 3
    assert (inp.dims, inp.patch, inp.spacing, inp.orientation) == (2, None, None, None)
    assert inp.normalization.scheme == "fixed" and not inp.normalization.nonzero
    written = json.loads(json.dumps(man.to_dict()))
    validate(written, "manifest")
    assert written["schema_version"] == 2 and written["input"]["spacing"] is None
    assert Manifest.from_dict(written) == man


def test_manifests_that_pad_or_blend_like_nnunet_say_version_3() -> None:
    """A reader older than input.pad/blend/gaussian ignores them (it would pad by reflection
    and blend probabilities): a manifest that needs them is written as version 3, which such a
    reader refuses; one that keeps their defaults stays version 2 and readable by it."""
    man = load_bundle("softmax-ensemble").manifest
    assert man.to_dict()["schema_version"] == 2
    for change in (
        {"pad": Padding(mode="constant", value=0.0, centre=True)},
        {"blend": "logits"},
        {"gaussian": "nnunet"},
    ):
        changed = dataclasses.replace(man, input=dataclasses.replace(man.input, **change))
        written = json.loads(json.dumps(changed.to_dict()))
        validate(written, "manifest")
        assert written["schema_version"] == 3, change
        assert Manifest.from_dict(written).input == dataclasses.replace(man.input, **change)
    newer = {**man.to_dict(), "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(BundleError, match="newer than this uqserve"):
        Manifest.from_dict(newer)


@pytest.mark.parametrize(
    ("inp", "message"),
    [
        ({"dims": 4}, "input.dims must be 2 or 3"),
        ({"patch": (64, 64, 64)}, "input.patch must be 2 sizes"),
        ({"spacing": (1.0,)}, "input.spacing must be 2 sizes"),
        ({"orientation": "RAX"}, "input.orientation 'RAX'"),
        ({"orientation": "RRS"}, "input.orientation 'RRS'"),
        ({"interpolation": "sinc"}, "input.interpolation"),
        ({"normalization": Normalization(scheme="ct")}, "needs clip"),
        ({"normalization": Normalization(scheme="fixed", nonzero=True)}, "zscore' scheme only"),
    ],
)
def test_manifest_geometry_is_checked(inp: dict[str, Any], message: str) -> None:
    man = load_bundle("ssn-ensemble").manifest
    bad = dataclasses.replace(man, input=dataclasses.replace(man.input, **inp))
    with pytest.raises(BundleError, match=message):
        bad.validate("m.json")


def test_geometry_manifest_round_trips_and_validates(tmp_path: Path) -> None:
    folder = _bundle(
        tmp_path, "softmax-ensemble", patch=(64, 64), spacing=(0.8, 0.8), orientation="RAS",
        interpolation="linear",
        normalization=Normalization(scheme="ct", mean=40.0, std=30.0, clip=(-100.0, 200.0)),
    )  # fmt: skip
    raw = json.loads((folder / "manifest.json").read_text())
    validate(raw, "manifest")
    assert raw["input"]["patch"] == [64, 64] and raw["input"]["orientation"] == "RAS"
    assert load_bundle(folder).manifest.input == InputSpec(
        channels=1, tile_size=(64, 64), multiple=4, dims=2, patch=(64, 64),
        spacing=(0.8, 0.8), orientation="RAS", interpolation="linear",
        normalization=Normalization(scheme="ct", mean=40.0, std=30.0, clip=(-100.0, 200.0)),
    )  # fmt: skip


# --------------------------------------------------------------------------- intensity


def test_ct_and_nonzero_zscore_normalisation() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(50, 300, (20, 18, 6)).astype(np.float32)
    man = load_bundle("ssn-ensemble").manifest
    ct = dataclasses.replace(
        man.input, normalization=Normalization("ct", 40.0, 20.0, (-100.0, 150.0))
    )
    out = normalize_volume(data, dataclasses.replace(man, input=ct), [], "x")
    np.testing.assert_allclose(out, (np.clip(data, -100, 150) - 40) / 20, rtol=1e-5, atol=1e-5)

    data[:4] = 0.0  # a zero border: outside the nonzero mask
    data[10, 9, 3] = 0.0  # a hole inside: filled, so inside the mask
    nz = dataclasses.replace(man.input, normalization=Normalization("zscore", nonzero=True))
    out = normalize_volume(data, dataclasses.replace(man, input=nz), [], "x")
    mask = nonzero_mask(data)
    assert mask[10, 9, 3] and not mask[:4].any()
    assert np.all(out[:4] == 0)
    inside = data[mask].astype(np.float64)
    np.testing.assert_allclose(out[mask], (inside - inside.mean()) / inside.std(), atol=1e-4)


# --------------------------------------------------------------------------- resampling


def test_resample_rules() -> None:
    assert target_shape((100, 80, 30), (1.0, 1.005, 3.0), (1.0, 1.0, 1.5)) == (100, 80, 60)
    assert target_shape((100, 80, 1), (0.5, 0.5, 3.0), (1.0, 1.0, 1.0)) == (50, 40, 1)
    # anisotropy > 3: the thick axis nearest (nnU-Net's separate z)
    assert image_orders((0.7, 0.7, 5.0), (0.7, 0.7, 5.0), 3) == (3, 3, 0)
    assert image_orders((1.0, 1.0, 2.0), (1.0, 1.0, 1.0), 3) == (3, 3, 3)
    ramp = np.add.outer(np.add.outer(np.arange(12.0), 2 * np.arange(10.0)), np.zeros(4))
    up = resample(ramp.astype(np.float32), (24, 20, 4), (1, 1, 1))
    # edge-aligned grids: output voxel o samples (o + 0.5) / 2 - 0.5 (clamped at the edges)
    c = np.clip((np.arange(24) + 0.5) / 2 - 0.5, 0, 11)
    np.testing.assert_allclose(up[:, 0, 0], c, atol=1e-5)
    same = np.zeros((3, 4, 5), np.float32)
    assert resample(same, (3, 4, 5), (3, 3, 3)) is same


def test_windows_follow_nnunet_steps_and_weights() -> None:
    assert starts(64, 64) == [0] and starts(50, 64) == [0]
    assert starts(160, 64) == [0, 32, 64, 96] and starts(100, 64) == [0, 18, 36]
    w = gaussian_weights((64, 32))
    assert w.shape == (64, 32) and w.max() == 1.0 and w.min() > 0
    assert w[31, 15] == w[32, 16] == 1.0 and w[0, 0] < 1e-3  # sigma = patch / 8


# --------------------------------------------------------------------------- predict


def test_scan_at_target_geometry_goes_through_untouched(tmp_path: Path) -> None:
    """Orientation and spacing already the bundle's: no interpolation, today's maps exactly."""
    vol = read_volume(MRI)
    plain = predict_volume(vol, "ssn-ensemble", want_samples=True)
    geo = _bundle(tmp_path, "ssn-ensemble", orientation="LAS", spacing=(2.01, 1.99))
    same = predict_volume(vol, geo, want_samples=True)
    for name, a in _maps(plain).items():
        assert np.array_equal(a, getattr(same, name)), name
    assert same.report["geometry"]["resampled"] is False
    assert same.report["geometry"]["reoriented"] is False
    assert same.report["scores"] == plain.report["scores"]


def test_flipped_storage_gives_the_same_maps_in_physical_space(tmp_path: Path) -> None:
    vol = read_volume(MRI)  # stored LAS
    flipped = _flipped(vol, 0)  # the same image stored RAS
    # as stored, the model sees a mirrored image: the maps differ
    a = predict_volume(vol, "softmax-ensemble")
    b = predict_volume(flipped, "softmax-ensemble")
    assert not np.array_equal(a.prob, np.flip(b.prob, 1))
    geo = _bundle(tmp_path, "softmax-ensemble", orientation="RAS")
    a = predict_volume(vol, geo)
    b = predict_volume(flipped, geo)
    assert a.report["geometry"]["reoriented"] is True
    assert b.report["geometry"]["reoriented"] is False
    assert a.report["geometry"]["model_orientation"] == "RAS"
    for name, m in _maps(a).items():
        other = getattr(b, name)
        assert np.array_equal(m, np.flip(other, other.ndim - 3)), name
    assert a.report["volumes"] == b.report["volumes"]


def test_resampled_maps_come_back_on_the_input_grid(tmp_path: Path) -> None:
    vol = read_volume(MRI)
    geo = _bundle(tmp_path, "ssn-ensemble", spacing=(1.4, 1.4), orientation="RAS")
    p = predict_volume(vol, geo, want_samples=True)
    g = p.report["geometry"]
    assert g["resampled"] and g["model_shape"] == [47, 59, 25] and g["model_spacing"][2] == 2.0
    shape = vol.shape
    assert p.tu.shape == p.au.shape == p.eu.shape == p.seg.shape == shape
    assert p.prob.shape == (2, *shape) and p.sample_labels is not None
    assert p.sample_labels.shape == (5, 16, *shape)
    np.testing.assert_allclose(p.prob.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(p.tu, p.au + p.eu, rtol=0, atol=2e-7)
    assert (p.eu >= 0).all() and (p.au_latent >= 0).all()
    np.testing.assert_array_equal(p.seg, np.argmax(p.prob, axis=0))
    # the model at 1.4 mm agrees broadly with the model at the scan's 2 mm
    plain = predict_volume(vol, "ssn-ensemble")
    assert np.mean(plain.seg == p.seg) > 0.85


def test_sliding_windows_match_whole_slices_and_ignore_batch_size(tmp_path: Path) -> None:
    """The example phantom (128 x 128 slices) in 64 x 64 windows, the shipped tile."""
    vol = read_volume(Path(__file__).resolve().parents[1] / "examples" / "example.nii.gz")
    vol = dataclasses.replace(vol, data=vol.data[:, :, 8:14])
    whole = predict_volume(vol, "softmax-ensemble")
    geo = _bundle(tmp_path, "softmax-ensemble", patch=(64, 64))
    win = predict_volume(vol, geo, batch_size=1)
    assert win.report["geometry"]["windows"] == 9
    assert np.mean(win.seg == whole.seg) > 0.97
    assert float(np.abs(win.prob - whole.prob).mean()) < 0.02
    other = predict_volume(vol, geo, batch_size=7)
    for name, m in _maps(win).items():
        assert np.array_equal(m, getattr(other, name)), name
    np.testing.assert_array_equal(win.sample_counts, other.sample_counts)


def test_window_noise_is_fixed_by_voxel_position(tmp_path: Path) -> None:
    """SSN samples: stitched per-sample counts equal over batch sizes; TU = AU + EU."""
    vol = read_volume(MRI)
    geo = _bundle(tmp_path, "ssn-ensemble", patch=(24, 24))
    a = predict_volume(vol, geo, batch_size=2, want_samples=True)
    b = predict_volume(vol, geo, batch_size=5, want_samples=True)
    assert a.report["geometry"]["windows"] == 6  # 2 x 3 windows of 24 over 33 x 41
    assert a.sample_labels is not None and b.sample_labels is not None
    np.testing.assert_array_equal(a.sample_labels, b.sample_labels)
    np.testing.assert_array_equal(a.sample_counts, b.sample_counts)
    assert a.sample_counts.sum(axis=2).max() == vol.data.size  # every voxel counted once
    np.testing.assert_allclose(a.tu, a.au + a.eu, rtol=0, atol=2e-7)
    assert (a.au_latent > 0).any()


# --------------------------------------------------------------------------- 3D members

EXAMPLE4D = MRI.with_name("example4d.nii.gz")  # real fMRI, 128 x 96 x 24 at 2 x 2 x 2.2 mm


def _user_onnx_3d(path: Path, seed: int) -> Path:
    """A small volumetric net ``[B,1,D,H,W] -> [B,2,D,H,W]`` (logits), seeded weights."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 2, 3, padding=1)
    ).eval()
    torch.onnx.export(
        net, (torch.zeros(1, 1, 8, 16, 16),), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={n: {0: "b", 2: "d", 3: "h", 4: "w"} for n in ("input", "logits")},
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def bundle_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uqserve.exporting import export_onnx_members

    tmp = tmp_path_factory.mktemp("b3d")
    files = [_user_onnx_3d(tmp / f"fold{i}.onnx", i) for i in range(2)]
    export_onnx_members(
        files, tmp / "b3d", dims=3, patch=(8, 32, 32), spacing=(3.0, 2.5, 2.5),
        orientation="RAS", normalization=Normalization("zscore"),
    )  # fmt: skip
    return tmp / "b3d"


def test_3d_member_contract_and_counts_in_the_valid_region(bundle_3d: Path) -> None:
    import onnxruntime as ort

    from uqserve.contracts import MEMBER_INPUT_SPEC_3D, MEMBER_OUTPUT_SPEC_3D

    man = load_bundle(bundle_3d).manifest
    assert (man.input.dims, man.input.patch, man.input.spacing) == (3, (8, 32, 32), (3.0, 2.5, 2.5))
    sess = ort.InferenceSession(str(bundle_3d / "member_0.onnx"))
    assert [i.name for i in sess.get_inputs()] == list(MEMBER_INPUT_SPEC_3D)
    assert [len(i.shape) for i in sess.get_inputs()] == [5, 1, 2, 2]
    assert [o.name for o in sess.get_outputs()] == list(MEMBER_OUTPUT_SPEC_3D)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 1, 8, 32, 32)).astype(np.float32)
    valid = np.array([[8, 32, 32], [5, 20, 9]], np.int64)
    mean, ent, counts, labels = sess.run(
        None,
        {"image": image, "seed": np.zeros(2, np.int64), "offset": np.zeros((2, 3), np.int64),
         "valid": valid},
    )  # fmt: skip
    assert mean.shape == (2, 2, 8, 32, 32) and ent.shape == (2, 8, 32, 32)
    np.testing.assert_allclose(ent, -(mean * np.log(mean)).sum(1), atol=1e-5)
    for j, (d, h, w) in enumerate(valid):
        want = np.bincount(labels[j, 0, :d, :h, :w].ravel(), minlength=2)
        np.testing.assert_array_equal(counts[j, 0], want)


def test_3d_bundle_on_an_anisotropic_scan(bundle_3d: Path) -> None:
    vol = read_volume(EXAMPLE4D, volume_index=0)
    assert vol.shape == (128, 96, 24) and vol.spacing[2] > vol.spacing[0]
    a = predict_volume(vol, bundle_3d, batch_size=1)
    g = a.report["geometry"]
    assert g["reoriented"] and g["resampled"] and g["model_orientation"] == "RAS"
    assert g["model_shape"] == [102, 77, 18] and g["windows"] == 4 * 4 * 6
    assert a.tu.shape == a.seg.shape == vol.shape and a.prob.shape == (2, *vol.shape)
    np.testing.assert_allclose(a.tu, a.au + a.eu, rtol=0, atol=2e-7)
    np.testing.assert_array_equal(a.seg, np.argmax(a.prob, axis=0))
    assert (a.eu > 0).any() and a.sample_counts.sum(axis=2).max() == 102 * 77 * 18
    b = predict_volume(vol, bundle_3d, batch_size=5)
    for name, m in _maps(a).items():
        assert np.array_equal(m, getattr(b, name)), name
    np.testing.assert_array_equal(a.sample_counts, b.sample_counts)
    # the same scan stored with its first axis flipped: the same maps in physical space
    c = predict_volume(_flipped(vol, 0), bundle_3d, batch_size=3)
    for name, m in _maps(a).items():
        other = getattr(c, name)
        assert np.array_equal(m, np.flip(other, other.ndim - 3)), name


def test_cli_exports_and_predicts_a_3d_bundle(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from uqserve.cli import app

    files = [str(_user_onnx_3d(tmp_path / f"f{i}.onnx", i)) for i in range(2)]
    runner = CliRunner()
    args = ["export", "--onnx", *files, "-o", str(tmp_path / "b"), "--dims", "3"]
    res = runner.invoke(app, [*args, "--spacing", "3,2.5,2.5", "--norm", "ct"])
    assert res.exit_code == 1 and "input.patch is required for dims 3" in res.output
    geo = ["--patch", "8,32,32", "--spacing", "3,2.5,2.5", "--orientation", "ras"]
    res = runner.invoke(app, [*args, *geo, "--norm", "ct"])
    assert res.exit_code == 1 and "normalization 'ct' needs clip" in res.output
    res = runner.invoke(
        app, [*args, *geo, "--norm", "ct", "--norm-clip", "-100,300", "--norm-mean", "50"]
    )
    assert res.exit_code == 0, res.output
    man = load_bundle(tmp_path / "b").manifest
    assert man.input.orientation == "RAS" and man.input.normalization.clip == (-100.0, 300.0)
    res = runner.invoke(
        app,
        ["predict", str(EXAMPLE4D), "-b", str(tmp_path / "b"), "-o", str(tmp_path / "out"),
         "--overlap", "0.25", "--volume-index", "0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "example4d" / "report.json").read_text())
    assert report["geometry"]["windows"] == 3 * 3 * 4  # fewer than 4 * 4 * 6 at overlap 0.25
    tu = nib.load(tmp_path / "out" / "example4d" / "tu.nii.gz")
    src = nib.load(EXAMPLE4D)
    assert tu.shape == (128, 96, 24) and np.array_equal(tu.affine, src.affine)
    assert int(tu.header["sform_code"]) == int(src.header["sform_code"])
    assert int(tu.header["qform_code"]) == int(src.header["qform_code"])


def test_a_voxel_gets_the_same_noise_in_every_window(tiny_bundle: Path) -> None:
    """Two overlapping windows of one slice: away from their edges (the 3x3 convolution
    sees the cut there) the sampled outputs agree bit for bit, because the noise is
    hashed from the global position ``offset + (y, x)``; the wrong offset breaks it."""
    from uqserve.runtime import Batch
    from uqserve.runtime.embedded import EmbeddedRuntime

    image = np.random.default_rng(3).normal(size=(1, 1, 40, 32)).astype(np.float32)

    def window(y0: int, offset_y: int) -> Batch:
        return Batch(
            image=np.ascontiguousarray(image[:, :, y0 : y0 + 24]),
            seed=np.array([5], np.int64),
            offset=np.array([[7, offset_y, 0]], np.int64),
            valid=np.array([[24, 32]], np.int64),
        )

    with EmbeddedRuntime(load_bundle(tiny_bundle), device="cpu") as rt:
        a = rt.infer(window(0, 0), want_samples=True)
        b = rt.infer(window(16, 16), want_samples=True)
        wrong = rt.infer(window(16, 0), want_samples=True)
    inner_a, inner_b = (slice(17, 23), slice(1, 31)), (slice(1, 7), slice(1, 31))
    for m in range(len(a)):
        ent_a, ent_b = a[m].sample_entropy[0][inner_a], b[m].sample_entropy[0][inner_b]
        assert np.array_equal(ent_a, ent_b)
        assert np.array_equal(
            a[m].mean[0][(slice(None), *inner_a)], b[m].mean[0][(slice(None), *inner_b)]
        )
        assert not np.array_equal(ent_b, wrong[m].sample_entropy[0][inner_b])
