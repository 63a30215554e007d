"""3D networks in the zoo: train on synthetic volumes, export, predict with sliding windows.

Tiny sizes (width 4, depth 2, a few steps) so the CLI round trip runs in seconds
on a CPU; the export itself checks ONNX against PyTorch on a partly padded window.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from uqserve.bundle import load_bundle
from uqserve.cli import app
from uqserve.data import write_nifti
from uqserve.data.synthetic import make_volume
from uqserve.errors import UsageError
from uqserve.models import ModelConfig, build_network
from uqserve.prediction import predict_volume
from uqserve.training import TrainConfig, TrainError, train

TINY = ["--width", "4", "--depth", "2", "--batch-size", "2", "--volumes", "2", "-q"]
MAPS = ("tu", "au", "eu", "prob", "seg")


def _train_export(tmp: Path, combination: str, members: int) -> Path:
    runner = CliRunner()
    args = ["train", combination, "-o", str(tmp / "ck"), "--dims", "3", "--patch", "8,16,16"]
    res = runner.invoke(app, [*args, "--steps", "3", "-m", str(members), *TINY])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp / "ck" / "config.json").read_text())
    assert cfg["model_config"]["dims"] == 3 and cfg["patch"] == [8, 16, 16]
    res = runner.invoke(app, ["export", "--checkpoints", str(tmp / "ck"), "-o", str(tmp / "b")])
    assert res.exit_code == 0, res.output
    return tmp / "b"


def test_3d_is_refused_where_it_is_not_built() -> None:
    with pytest.raises(UsageError, match="dims must be 2"):
        ModelConfig(dims=4)
    with pytest.raises(UsageError, match="AU softmax with EU none, ensemble, mcdropout"):
        build_network("ssn", ModelConfig(dims=3))
    for combination in ("punet-ensemble", "softmax-swag"):
        with pytest.raises(TrainError, match=f"{combination} is not available in 3D"):
            train(combination, "/nonexistent/out", model_config=ModelConfig(dims=3))
    with pytest.raises(TrainError, match="patch 8x12x16 must be a multiple of 8"):
        train("softmax-none", "/x", config=TrainConfig(patch=(8, 12, 16)),
              model_config=ModelConfig(dims=3, depth=4))  # fmt: skip


@pytest.mark.slow  # trains and exports a 3D ensemble through the CLI
def test_cli_trains_exports_and_predicts_a_3d_ensemble(tmp_path: Path) -> None:
    import onnxruntime as ort

    bundle = _train_export(tmp_path, "softmax-ensemble", 2)
    man = load_bundle(bundle).manifest
    assert (man.input.dims, man.input.patch, man.input.orientation) == (3, (8, 16, 16), "RAS")
    assert man.input.spacing == (3.0, 1.5, 1.5) and man.num_members == 2
    # the member contract: 3D inputs, counts only inside `valid`
    sess = ort.InferenceSession(str(bundle / "member_0.onnx"))
    assert [len(i.shape) for i in sess.get_inputs()] == [5, 1, 2, 2]
    image = np.random.default_rng(0).normal(size=(2, 1, 8, 16, 16)).astype(np.float32)
    valid = np.array([[8, 16, 16], [3, 11, 5]], np.int64)
    feeds = {"image": image, "seed": np.zeros(2, np.int64), "offset": np.zeros((2, 3), np.int64)}
    _, _, counts, labels = sess.run(None, {**feeds, "valid": valid})
    for j, (d, h, w) in enumerate(valid):
        want = np.bincount(labels[j, 0, :d, :h, :w].ravel(), minlength=2)
        np.testing.assert_array_equal(counts[j, 0], want)
    # a scan larger than the patch: sliding windows, maps on the input grid
    vol = make_volume(11, (40, 36, 20), (1.5, 1.5, 3.0)).volume
    nib.save(nib.Nifti1Image(vol.data, vol.affine), tmp_path / "scan.nii.gz")
    res = CliRunner().invoke(
        app,
        ["predict", str(tmp_path / "scan.nii.gz"), "-b", str(bundle), "-o", str(tmp_path / "o")],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "scan" / "report.json").read_text())
    assert report["geometry"]["windows"] > 1 and not report["geometry"]["resampled"]
    tu = nib.load(tmp_path / "o" / "scan" / "tu.nii.gz")
    assert tu.shape == vol.shape and np.allclose(tu.affine, vol.affine)
    a = predict_volume(vol, bundle, batch_size=1)
    assert a.tu.shape == a.seg.shape == vol.shape and a.prob.shape == (2, *vol.shape)
    np.testing.assert_allclose(a.tu, a.au + a.eu, rtol=0, atol=2e-7)
    assert (a.eu > 0).any()
    b = predict_volume(vol, bundle, batch_size=5)
    for name in MAPS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # exported uncalibrated; whole labelled synthetic scans calibrate it
    assert load_bundle(bundle).manifest.ood.threshold is None
    for i in range(4):
        case = make_volume(50 + i, (40, 36, 20), (1.5, 1.5, 3.0))
        folder = tmp_path / "cases" / f"case{i}"
        folder.mkdir(parents=True)
        write_nifti(case.volume, folder / "image.nii.gz")
        write_nifti(case.annotations[0], folder / "label_a.nii.gz", affine=case.volume.affine)
    args = ["calibrate", str(bundle), "--data", str(tmp_path / "cases"), "--n-ood", "2", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert load_bundle(bundle).manifest.ood.threshold is not None


@pytest.mark.slow  # trains and exports a 3D MC-dropout bundle
def test_3d_mc_dropout_masks_do_not_depend_on_the_windows(tmp_path: Path) -> None:
    bundle = _train_export(tmp_path, "softmax-mcdropout", 3)
    assert load_bundle(bundle).manifest.num_members == 3
    import onnxruntime as ort

    # one window's content at two global positions: the same masks, the same outputs;
    # another run seed: other masks
    sess = ort.InferenceSession(str(bundle / "member_1.onnx"))
    image = np.random.default_rng(1).normal(size=(1, 1, 8, 16, 16)).astype(np.float32)
    feeds = {"image": np.repeat(image, 2, axis=0), "valid": np.full((2, 3), [8, 16, 16])}
    offset = np.array([[0, 0, 0], [5, 17, 3]], np.int64)
    mean = sess.run(["mean"], {**feeds, "seed": np.zeros(2, np.int64), "offset": offset})[0]
    np.testing.assert_array_equal(mean[0], mean[1])
    other = sess.run(["mean"], {**feeds, "seed": np.array([0, 1]), "offset": offset})[0]
    assert np.abs(other[0] - other[1]).max() > 1e-4
    vol = make_volume(12, (36, 40, 20), (1.5, 1.5, 3.0)).volume
    a = predict_volume(vol, bundle, batch_size=2)
    assert a.report["geometry"]["windows"] > 1 and (a.eu > 0).any()
    np.testing.assert_allclose(a.tu, a.au + a.eu, rtol=0, atol=2e-7)
    b = predict_volume(vol, bundle, batch_size=7)
    for name in MAPS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
