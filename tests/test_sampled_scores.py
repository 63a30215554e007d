"""The scan's entanglement from a seeded subsample vs every voxel (``--exact-scores``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import blob_volume, write_nifti
from uqserve import uncertainty
from uqserve.uncertainty.sampled import _sample_true


def _maps(shape: tuple[int, ...], seed: int = 0) -> tuple[npt.NDArray[np.float32], ...]:
    """TU/AU/EU of five members whose logits share a smooth field: AU and EU correlate."""
    rng = np.random.default_rng(seed)
    base = np.cumsum(rng.normal(size=shape), axis=-1) / 4.0
    logits = base[None] + rng.normal(scale=1.5, size=(5, *shape))
    p1 = 1.0 / (1.0 + np.exp(-logits))
    probs = np.stack([1.0 - p1, p1], axis=1)[:, None].astype(np.float32)  # [M, S, K, *sp]
    dec = uncertainty.decompose(probs)
    return dec.tu, dec.au, dec.eu


def test_at_most_size_voxels_is_the_exact_computation() -> None:
    tu, au, eu = _maps((48, 40, 6))
    exact = uncertainty.scan_entanglement(tu, au, eu, 2)
    got = uncertainty.sampled_scan_entanglement(tu, au, eu, 2, size=tu.size, seed=3)
    assert got.exact and got.standard_error == 0.0 and got.size == got.population
    assert got.rho == exact  # the same code, bit for bit


def test_the_sample_is_seeded_uniform_and_of_fixed_size() -> None:
    mask = np.random.default_rng(0).random(3_000_000) < 0.3  # spans three sampling chunks
    a = _sample_true(mask, 50_000, np.random.default_rng(7))
    b = _sample_true(mask, 50_000, np.random.default_rng(7))
    c = _sample_true(mask, 50_000, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.size == 50_000 and np.all(np.diff(a) > 0) and mask[a].all()
    # uniform over the True voxels: each third of the array holds a third of the draws
    thirds = np.bincount(a * 3 // mask.size, minlength=3) / a.size
    np.testing.assert_allclose(thirds, 1 / 3, atol=0.01)


def test_standard_error_describes_the_spread_around_the_exact_value() -> None:
    tu, au, eu = _maps((64, 64, 24))
    exact = uncertainty.scan_entanglement(tu, au, eu, 2)
    assert exact is not None and 0.2 < abs(exact) < 0.95  # a rho the SE depends on
    runs = [
        uncertainty.sampled_scan_entanglement(tu, au, eu, 2, size=2000, seed=s) for s in range(200)
    ]
    population = runs[0].population
    assert population > 2000 and all(r.size == 2000 for r in runs)
    errors = np.array([r.rho - exact for r in runs if r.rho is not None])
    se = float(np.mean([r.standard_error for r in runs]))
    assert 0.8 < float(errors.std()) / se < 1.25  # the formula is the sampling spread
    assert abs(float(errors.mean())) < 3 * se / math.sqrt(errors.size)  # no bias
    assert np.abs(errors).max() < 4.5 * se


def test_bad_size_is_refused() -> None:
    tu, au, eu = _maps((8, 8, 2))
    for bad in (0, 50, 2.5, True):
        with pytest.raises(ValueError, match="size must be an integer >= 100"):
            uncertainty.sampled_scan_entanglement(tu, au, eu, 2, size=bad)  # type: ignore[arg-type]


def test_predict_reports_the_sample_and_exact_scores_ranks_all(
    tiny_softmax_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uqserve.prediction import Predictor
    from uqserve.schemas import validate

    scan = write_nifti(tmp_path / "scan.nii.gz", blob_volume((64, 60, 6)))
    monkeypatch.setattr(uncertainty, "SCORE_SAMPLE", 1000)  # a small scan, a smaller sample
    with Predictor(tiny_softmax_bundle, seed=4) as p:
        sampled = p.predict(scan)
    with Predictor(tiny_softmax_bundle, seed=4, exact_scores=True) as p:
        exact = p.predict(scan)
    ent, want = sampled.report["entanglement"], exact.report["entanglement"]
    validate(json.loads(json.dumps(sampled.report)), "report", "report")
    assert "sample" not in want
    assert want["scan"] == uncertainty.scan_entanglement(exact.tu, exact.au, exact.eu, 2)
    sample = ent["sample"]
    assert sample["size"] == 1000 and sample["seed"] == 4
    assert sample["population"] == int(np.count_nonzero(exact.tu > 0.05 * math.log(2)))
    assert sample["population"] > 1000
    assert 0 < sample["standard_error"] < 0.1
    assert ent["scan"] is not None and want["scan"] is not None
    assert abs(ent["scan"] - want["scan"]) < 4.5 * sample["standard_error"]
    for name in ("tu", "au", "eu", "seg", "prob"):  # only the score is sampled
        np.testing.assert_array_equal(getattr(sampled, name), getattr(exact, name))


def test_cli_exact_scores(tiny_softmax_bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from uqserve.cli import app

    scan = write_nifti(tmp_path / "scan.nii.gz", blob_volume())
    res = CliRunner().invoke(
        app, ["predict", str(scan), "-o", str(tmp_path / "o"), "-b", str(tiny_softmax_bundle),
              "--exact-scores", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "sample" not in json.loads(res.stdout.splitlines()[0])["entanglement"]
