"""`uqserve export --nnunet` against nnU-Net v2's own predictor.

nnU-Net itself (``tests/_nnunet_reference.py``, in a subprocess) plans two
tiny synthetic datasets, an MR-style one (z-score, stored LAS, identity
``transpose_forward``) and a CT-style one (CT normalisation, thick x axis:
``transpose_forward`` [2, 0, 1]), writes fold checkpoints of networks as its
trainer initialises them (biases and norm parameters randomised, the last
layer scaled; no smoothing, nothing fitted to an image) and predicts test
cases with ``nnUNetPredictor`` (CPU, probabilities saved): one smaller than
the patch in some axes (nnU-Net pads it with 0, centred), one larger than the
patch in every axis (overlapping windows, blended in logit space), one at
another spacing in a frame of zeros (cropped to the nonzero box, resampled).
uqserve exports the same model folders and predicts the same NIfTI files;
both are compared on the input grid, every voxel counted, for the 2d and the
3d_fullres configuration.

Thresholds: one fold without mirroring agrees to 5e-3 in probability
everywhere except the outermost voxel layer and in >= 99.9 % of the labels;
two folds (nnU-Net averages their logits, uqserve their probabilities, which
the decomposition needs) and mirroring in >= 99.5 %; a cropped and resampled
case in >= 98 %.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import uqserve
from uqserve.bundle import InputSpec, Padding
from uqserve.exporting import ExportError, export_nnunet

pytestmark = pytest.mark.slow

REFERENCE = Path(__file__).with_name("_nnunet_reference.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """nnU-Net's datasets, model folders and predictions (``reference.json``)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "1"}
    proc = subprocess.run(
        [sys.executable, str(REFERENCE), str(root)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref: dict[str, Any] = json.loads((root / "reference.json").read_text())
    return ref


def _nnunet_probs(out_dir: str, image: str) -> np.ndarray:
    """nnU-Net's saved probabilities ``[K, z, y, x]`` as uqserve's ``[K, X, Y, Z]``."""
    case = Path(image).name.replace("_0000.nii.gz", "")
    probs = np.load(Path(out_dir) / f"{case}.npz")["probabilities"]
    return np.transpose(probs, (0, 3, 2, 1)).astype(np.float32)


def _nonzero_box(image: str) -> tuple[slice, ...]:
    """The bounding box of the nonzero voxels of ``image`` (what nnU-Net crops to)."""
    import nibabel as nib

    nz = np.asarray(nib.load(image).dataobj) != 0
    box = []
    for ax in range(3):
        hit = np.flatnonzero(nz.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _compare(ref: dict[str, Any], key: str, run: str, tmp_path: Path) -> list[dict[str, Any]]:
    """uqserve's prediction of each test case of ``run`` against nnU-Net's, every voxel."""
    spec = ref[key]["runs"][run]
    bundle = export_nnunet(
        spec["model_dir"], tmp_path / f"{key}_{run}",
        folds=[str(f) for f in spec["folds"]], mirror=spec["mirror"],
    )  # fmt: skip
    assert bundle.manifest.num_members == len(spec["folds"])
    stats = []
    for image in spec["tests"]:
        pred = uqserve.predict_volume(uqserve.read_volume(image), bundle, seed=0)
        theirs = _nnunet_probs(spec["out"], image)
        assert pred.prob.shape == theirs.shape
        labels = theirs.argmax(axis=0)
        # Both classes well represented, or agreement would prove little.
        assert 0.02 < float((labels == 1).mean()) < 0.98, "degenerate reference"
        inner = np.zeros(labels.shape, bool)
        inner[1:-1, 1:-1, 1:-1] = True
        diff = np.abs(pred.prob - theirs).max(axis=0)
        geometry = pred.report["geometry"]
        stats.append(
            {
                "case": Path(image).name,
                "inner_max_abs": float(diff[inner].max()),
                "same_labels": float((pred.seg == labels).mean()),
                "far_from_half": float((np.abs(theirs[1] - 0.5) > 0.3).mean()),
                "model_shape": geometry["model_shape"],
                "windows": geometry["windows"],
            }
        )
    return stats


def _reaches_padding_and_windows(stats: list[dict[str, Any]], inp: InputSpec) -> None:
    """The first case is smaller than the patch in some axis (padded), the second
    larger in every axis (windows overlap along each)."""
    assert inp.patch is not None
    if inp.dims == 3:  # patch (z, y, x), model grid [X', Y', Z']
        axes, window = [0, 1, 2], list(reversed(inp.patch))
    else:  # patch (rows, cols) of a slice: the in-plane axes in order
        axes, window = [a for a in range(3) if a != inp.slice_axis], list(inp.patch)
    small, large = ([s["model_shape"][a] for a in axes] for s in stats)
    assert any(n < p for n, p in zip(small, window, strict=True)), (small, window)
    assert all(n > p for n, p in zip(large, window, strict=True)), (large, window)


@pytest.mark.parametrize("key", ["mr", "ct"])
@pytest.mark.parametrize("run", ["2d_fold0", "3d_fold0"])
def test_one_fold_matches_nnunet(
    reference: dict[str, Any], key: str, run: str, tmp_path: Path
) -> None:
    """One fold, no mirroring: nnU-Net's probabilities to 5e-3 and >= 99.9 % of its labels,
    on a case smaller than the patch and one larger. Catches reflection or far-edge
    padding instead of nnU-Net's centred 0 (a small case's every voxel changes),
    probability instead of logit blending, another Gaussian (centre, sigma, float16
    rounding, float32 weight sums) and a wrong axis order or flip."""
    stats = _compare(reference, key, run, tmp_path)
    spec = reference[key]["runs"][run]
    _reaches_padding_and_windows(
        stats, uqserve.load_bundle(tmp_path / f"{key}_{run}").manifest.input
    )
    for s in stats:
        assert s["far_from_half"] > 0.3, s
        assert s["inner_max_abs"] <= 5e-3, s
        assert s["same_labels"] >= 0.999, s
    assert spec["folds"] == [0] and not spec["mirror"]


@pytest.mark.parametrize("key", ["mr", "ct"])
@pytest.mark.parametrize("run", ["2d_folds01", "3d_folds01"])
def test_two_folds_match_nnunet(
    reference: dict[str, Any], key: str, run: str, tmp_path: Path
) -> None:
    """Two folds: >= 99.5 % of nnU-Net's labels. Catches a fold lost, folds swapped
    or members blended across each other (nnU-Net averages the folds' logits,
    uqserve their probabilities: the ensemble's p̄ that the decomposition needs)."""
    for s in _compare(reference, key, run, tmp_path):
        assert s["same_labels"] >= 0.995, s


@pytest.mark.parametrize("key", ["mr", "ct"])
@pytest.mark.parametrize("run", ["2d_fold0_mirror", "3d_fold0_mirror"])
def test_mirroring_matches_nnunet(
    reference: dict[str, Any], key: str, run: str, tmp_path: Path
) -> None:
    """Test-time mirroring baked into the graph: >= 99.5 % of nnU-Net's labels.
    Catches flips along the wrong axes (after transpose_forward) or flip
    combinations missed."""
    for s in _compare(reference, key, run, tmp_path):
        assert s["same_labels"] >= 0.995, s


def test_manifest_carries_nnunet_plans(reference: dict[str, Any], tmp_path: Path) -> None:
    """CT: clip to the foreground percentiles, then mean/std; geometry kept in extra."""
    model_dir = Path(reference["ct"]["model_dir"])
    plans = json.loads((model_dir / "plans.json").read_text())
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    out = tmp_path / "ct"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("uqserve")), "export", "--nnunet", str(model_dir),
         "-o", str(out), "--folds", "0,1", "--mirror"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "not calibrated (no OOD threshold)" in proc.stdout
    man = uqserve.load_bundle(out).manifest
    assert (man.au, man.eu, man.num_members) == ("softmax", "ensemble", 2)
    assert man.classes == ("background", "lesion")
    assert not man.validation, "an nnU-Net export must not calibrate on synthetic data"
    norm = man.input.normalization
    assert norm.scheme == "ct"
    assert norm.clip == (props["percentile_00_5"], props["percentile_99_5"])
    assert (norm.mean, norm.std) == (props["mean"], props["std"])
    nn = man.extra["nnunet"]
    assert nn["transpose_forward"] == [2, 0, 1] and nn["transpose_backward"] == [1, 2, 0]
    assert nn["slice_axis"] == 0 and nn["mirror"] is True and nn["folds"] == ["0", "1"]
    # 2d: slices along the plans' axis, whatever a scan's thickest; nnU-Net's crop
    assert man.input.slice_axis == 0 and man.input.crop_nonzero
    assert man.input.tile_size == man.input.patch == tuple(reversed(nn["patch_size"]))
    assert man.input.spacing == tuple(reversed(nn["spacing"]))
    # nnU-Net's predictor: 0 after normalisation, centred; logits blended, its Gaussian
    assert man.input.pad == Padding(mode="constant", value=0.0, centre=True)
    assert (man.input.blend, man.input.gaussian) == ("logits", "nnunet")


@pytest.mark.parametrize("key", ["mr", "ct"])
@pytest.mark.parametrize("run", ["2d_fold0_cropped", "3d_fold0_cropped"])
def test_cropped_and_resampled_case_matches_nnunet(
    reference: dict[str, Any], key: str, run: str, tmp_path: Path
) -> None:
    """A case at 0.8x the training spacing in-plane and 1.25x along the thick axis,
    in a frame of zeros: cropped to the nonzero box, normalised, resampled to the
    model grid and back: >= 98 % of nnU-Net's labels. Catches a wrong crop box,
    normalising before cropping, and resampling the wrong way (axes,
    interpolation order, probabilities vs logits; linear instead of nearest
    along the thick axis on the way back: 97.5 % in 3D)."""
    for s in _compare(reference, key, run, tmp_path):
        assert s["same_labels"] >= 0.98, s


def test_cropped_case_reports_its_box(reference: dict[str, Any], tmp_path: Path) -> None:
    """Outside the nonzero box: background with probability 1 and no uncertainty."""
    spec = reference["mr"]["runs"]["3d_fold0_cropped"]
    bundle = export_nnunet(spec["model_dir"], tmp_path / "crop", folds=["0"])
    assert bundle.manifest.input.crop_nonzero
    (image,) = spec["tests"]
    pred = uqserve.predict_volume(uqserve.read_volume(image), bundle, seed=0)
    box = _nonzero_box(image)
    crop = pred.report["geometry"]["crop"]
    assert crop == {"start": [b.start for b in box], "stop": [b.stop for b in box]}
    outside = np.ones(pred.seg.shape, bool)
    outside[box] = False
    assert outside.any() and (pred.prob[0][outside] == 1.0).all()
    assert not pred.seg[outside].any() and not pred.tu[outside].any()


def test_3d_manifest_is_volumetric(reference: dict[str, Any], tmp_path: Path) -> None:
    """3d_fullres: [B, C, D, H, W] members, patch and spacing as (z, y, x)."""
    spec = reference["ct"]["runs"]["3d_fold0"]
    man = export_nnunet(spec["model_dir"], tmp_path / "ct3d", folds=["0"]).manifest
    nn = man.extra["nnunet"]
    back = nn["transpose_backward"]
    assert (man.input.dims, man.input.orientation, man.input.slice_axis) == (3, None, None)
    assert man.input.patch == tuple(nn["patch_size"][j] for j in back) == (32, 32, 8)
    assert man.input.spacing == tuple(nn["spacing"][j] for j in back)


def test_calibrate_on_the_users_own_volumes(reference: dict[str, Any], tmp_path: Path) -> None:
    """nnU-Net bundles calibrate on whole scans through predict's geometry (not 1 mm slices)."""
    import nibabel as nib

    from uqserve.calibration import VALIDATION_KEYS, calibrate

    data = tmp_path / "data"
    tests = [reference["mr"]["files"][c] for c in ("small", "large")]
    for i, image in enumerate([*tests, *tests][:4]):
        (data / f"case{i}").mkdir(parents=True)
        shutil.copy(image, data / f"case{i}" / "image.nii.gz")
        img = nib.load(image)
        # labels: the bright half of the scan (any fixed rule: Dice is only recorded)
        labels = (np.asarray(img.dataobj) > np.median(np.asarray(img.dataobj))).astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, img.affine), str(data / f"case{i}" / "label_a.nii.gz"))
    for run in ("2d_folds01", "3d_fold0"):
        out = tmp_path / run
        folds = ["0", "1"] if run == "2d_folds01" else ["0"]
        export_nnunet(reference["mr"]["runs"][run]["model_dir"], out, folds=folds)
        man = calibrate(out, data, n_ood=1, severities=(0.7,))
        assert set(VALIDATION_KEYS) <= set(man.validation), run
        assert man.validation["data"]["unit"] == "volume"
        assert 0.0 <= man.validation["id"]["dice"] <= 1.0
        if man.num_members > 1:
            assert man.ood.threshold is not None and len(man.ood.validation_scores) == 2
        else:
            assert man.ood.threshold is None and "no EU method" in man.validation["note"]


def _variant(model_dir: Path, tmp_path: Path, configuration: str, conf: dict[str, Any]) -> Path:
    """A copy of ``model_dir`` posing as another configuration of the same plans."""
    parts = model_dir.name.split("__")
    dst = tmp_path / "__".join([*parts[:-1], configuration])
    shutil.copytree(model_dir, dst)
    plans = json.loads((dst / "plans.json").read_text())
    plans["configurations"][configuration] = {"inherits_from": "2d", **conf}
    (dst / "plans.json").write_text(json.dumps(plans))
    return dst


@pytest.mark.parametrize(
    ("configuration", "conf", "reason"),
    [
        ("3d_cascade_fullres", {"previous_stage": "3d_lowres"}, "cascade stage"),
        ("3d_lowres", {"next_stage": ["3d_cascade_fullres"]}, "first stage of a cascade"),
    ],
)
def test_unsupported_configurations_are_refused(
    reference: dict[str, Any], tmp_path: Path, configuration: str, conf: dict[str, Any],
    reason: str,
) -> None:  # fmt: skip
    src = _variant(Path(reference["mr"]["model_dir"]), tmp_path, configuration, conf)
    with pytest.raises(ExportError, match=reason):
        export_nnunet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_named(reference: dict[str, Any], tmp_path: Path) -> None:
    model_dir = reference["mr"]["model_dir"]
    with pytest.raises(ExportError, match=r"fold_3/checkpoint_final\.pth: no such checkpoint"):
        export_nnunet(model_dir, tmp_path / "out", folds=["3"])
    assert not (tmp_path / "out").exists()
