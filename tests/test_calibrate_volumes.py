"""`uqserve calibrate BUNDLE --data DIR` on whole volumes, for bundles with geometry.

A 3D bundle (two hand-made ONNX folds, a target spacing, RAS, sliding
windows) is calibrated through the real CLI on a temporary folder of small
anisotropic NIfTI scans with label maps. Calibration must run each case
through predict's geometry (reorientation, resampling, windows), write the
same ``manifest.validation`` keys as on synthetic data, and predict must then
flag with the new threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests import test_geometry
from uqserve.bundle import load_bundle
from uqserve.calibration import VALIDATION_KEYS
from uqserve.cli import app
from uqserve.contracts import PAPER_SHIFTS
from uqserve.data import write_nifti
from uqserve.volumes import Volume

# Stored as L-P-S with 2 x 2 x 4 mm voxels: the bundle (RAS, 3 x 2.5 x 2.5 mm)
# must reorient and resample every case.
_AFFINE = np.diag([-2.0, -2.0, 4.0, 1.0])

# test_geometry's module fixture: two seeded 3D folds, 3 x 2.5 x 2.5 mm, RAS, windows.
bundle_3d = test_geometry.bundle_3d


def _cases(root: Path, n: int) -> Path:
    """``n`` cases: a bright ellipsoid in noise, labelled by one annotator."""
    rng = np.random.default_rng(7)
    x, y, z = np.meshgrid(np.arange(28), np.arange(24), np.arange(10), indexing="ij")
    for i in range(n):
        r = 6 + i
        blob = ((x - 14) / r) ** 2 + ((y - 12) / r) ** 2 + ((z - 5) / 3) ** 2 <= 1.0
        image = (100.0 * blob + rng.normal(20.0, 8.0, blob.shape)).astype(np.float32)
        folder = root / f"case{i:02d}"
        folder.mkdir(parents=True)
        write_nifti(Volume(image, _AFFINE, f"case{i:02d}"), folder / "image.nii.gz")
        write_nifti(blob.astype(np.uint8), folder / "label_a.nii.gz", affine=_AFFINE)
    return root


def test_calibrate_on_whole_volumes_then_predict_uses_the_threshold(
    bundle_3d: Path, tmp_path: Path
) -> None:
    data = _cases(tmp_path / "cases", 4)
    before = load_bundle(bundle_3d).manifest
    assert before.ood.threshold is None
    runner = CliRunner()
    res = runner.invoke(
        app, ["calibrate", str(bundle_3d), "--data", str(data), "--n-ood", "2", "-q", "--json"]
    )
    assert res.exit_code == 0, res.output
    man = load_bundle(bundle_3d).manifest
    assert man.manifest_version == before.manifest_version + 1
    v = man.validation
    assert set(VALIDATION_KEYS) <= set(v)
    desc = v["data"]
    assert (desc["unit"], desc["n_cases"], desc["n_val"], desc["n_test"]) == ("volume", 4, 2, 2)
    assert desc["shifts"] == list(PAPER_SHIFTS)  # a folder has no OOD scans: shifted copies
    # The threshold is the quantile of the 2 validation cases' image-level EU.
    scores = np.asarray(man.ood.validation_scores)
    assert scores.size == v["n_validation_scores"] == 2 and (scores > 0).all()
    assert man.ood.threshold == pytest.approx(float(np.quantile(scores, 0.95)))
    assert man.ood.aggregator == man.default_aggregator in v["ood_auroc_eu_by_aggregator"]
    # Dice against the labels: measured on the scans' own grid.
    assert 0.0 <= v["id"]["dice"] <= 1.0
    assert json.loads(res.output)["ood"]["threshold"] == pytest.approx(man.ood.threshold)

    res = runner.invoke(app, ["info", str(bundle_3d)])
    assert res.exit_code == 0, res.output
    assert "validation" in res.output and "ood_auroc_eu" in res.output
    assert f"{man.ood.threshold}"[:6] in res.output

    out = tmp_path / "out"
    scan = data / "case01" / "image.nii.gz"
    res = runner.invoke(app, ["predict", str(scan), "-b", str(bundle_3d), "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(next(out.rglob("report.json")).read_text())
    assert report["ood"]["threshold"] == pytest.approx(man.ood.threshold)
    assert report["ood"]["aggregator"] == man.ood.aggregator
    assert report["ood"]["flag"] == (report["ood"]["score"] > man.ood.threshold)


def test_calibrate_on_one_volume_is_refused(bundle_3d: Path, tmp_path: Path) -> None:
    data = _cases(tmp_path / "one", 1)
    res = CliRunner().invoke(app, ["calibrate", str(bundle_3d), "--data", str(data), "-q"])
    assert res.exit_code != 0
    assert "annotated case; evaluate needs at least 2" in res.output


def test_evaluate_runs_whole_volumes_too(bundle_3d: Path, tmp_path: Path) -> None:
    data = _cases(tmp_path / "cases", 3)
    out = tmp_path / "ev"
    res = CliRunner().invoke(
        app, ["evaluate", str(bundle_3d), "--data", str(data), "--out", str(out), "--n-ood", "1"]
    )
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    text = json.dumps(results)
    assert '"unit": "volume"' in text and '"n_cases": 3' in text
    assert (out / "figures" / "summary.png").stat().st_size > 0
