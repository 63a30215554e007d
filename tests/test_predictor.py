"""``uqserve.Predictor``: a bundle opened once, then scans predicted in memory or to files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import uqserve
from tests.conftest import blob_volume, write_nifti
from uqserve.prediction import PredictError, Predictor, RuntimeOptions
from uqserve.runtime import RuntimeServiceError, open_runtime

MAPS = ("seg", "prob", "tu", "au", "eu")


def _same_maps(a: uqserve.Prediction, b: uqserve.Prediction) -> None:
    for name in MAPS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_one_runtime_serves_every_scan_and_matches_predict_volume(
    tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    volume = uqserve.read_volume(scan)
    expected = uqserve.predict_volume(volume, tiny_bundle)
    with uqserve.Predictor(tiny_bundle, uqserve.RuntimeOptions(device="cpu")) as predictor:
        runtime = predictor.runtime
        from_path = predictor.predict(scan)
        from_volume = predictor.predict(volume, want_samples=True)
        results = predictor.predict_files([scan], tmp_path / "out")
        assert predictor.runtime is runtime  # opened once, reused
    assert not predictor.is_open
    _same_maps(from_path, expected)
    _same_maps(from_volume, expected)
    assert from_volume.sample_labels is not None and from_path.sample_labels is None
    assert [r.ok for r in results] == [True]
    # The same files as the one-call uqserve.predict.
    uqserve.predict([scan], tmp_path / "again", tiny_bundle, device="cpu")
    for name in ("seg.nii.gz", "tu.nii.gz", "eu.nii.gz"):
        a = (tmp_path / "out" / "scan" / name).read_bytes()
        assert a == (tmp_path / "again" / "scan" / name).read_bytes(), name


def test_seed_batch_size_and_overlap_apply_to_every_scan(tiny_bundle: Path, scan: Path) -> None:
    volume = uqserve.read_volume(scan)
    with Predictor(tiny_bundle, seed=7, batch_size=3) as predictor:
        pred = predictor.predict(volume)
    _same_maps(pred, uqserve.predict_volume(volume, tiny_bundle, seed=7))
    assert pred.report["seed"] == 7
    with pytest.raises(PredictError, match="batch_size"):
        Predictor(tiny_bundle, batch_size=0)
    with pytest.raises(PredictError, match="overlap"):
        Predictor(tiny_bundle, overlap=1.0)


def test_a_given_runtime_is_used_and_left_open(tiny_bundle: Path, scan: Path) -> None:
    with open_runtime(tiny_bundle, device="cpu") as runtime:
        with Predictor(runtime=runtime) as predictor:
            assert predictor.runtime is runtime and predictor.bundle is runtime.bundle
            predictor.predict(scan)
        predictor.predict(scan)  # still open: the caller owns it
    with pytest.raises(PredictError, match="not both"):
        Predictor(runtime=runtime, options=RuntimeOptions())


def test_a_bad_scan_keeps_the_runtime_a_runtime_failure_reopens_it(
    tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a scan")
    predictor = Predictor(tiny_bundle, RuntimeOptions(device="cpu"))
    first = predictor.open()
    with pytest.raises(ValueError, match=r"bad\.nii\.gz"):
        predictor.predict(bad)
    assert predictor.runtime is first  # the scan's fault: sessions kept
    first.close()  # the runtime breaks underneath (a GPU reset, a killed server)
    with pytest.raises(RuntimeServiceError, match="closed"):
        predictor.predict(scan)
    assert not predictor.is_open  # closed, so that ...
    pred = predictor.predict(scan)  # ... the next scan opens a fresh runtime
    assert predictor.runtime is not first and pred.seg.shape == (40, 36, 5)
    predictor.close()


def test_options_are_checked_and_a_dead_server_fails_at_open(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="list of URLs"):
        RuntimeOptions(servers="127.0.0.1:8001")  # type: ignore[arg-type]
    assert RuntimeOptions(servers=["a:1", "b:2"]).servers == ("a:1", "b:2")  # type: ignore[arg-type]
    predictor = Predictor(tiny_bundle, RuntimeOptions(servers=("127.0.0.1:9",), timeout_s=2))
    with pytest.raises((RuntimeServiceError, ValueError), match=r"127\.0\.0\.1:9"):
        predictor.open()
    assert not predictor.is_open


def test_predict_files_checks_options_before_opening(tiny_bundle: Path, tmp_path: Path) -> None:
    scan = write_nifti(tmp_path / "s.nii.gz", blob_volume((16, 12, 2)))
    predictor = Predictor(tiny_bundle, RuntimeOptions(device="cpu"))
    with pytest.raises(ValueError, match="on_error"):
        predictor.predict_files([scan], tmp_path / "o", on_error="ignore")
    with pytest.raises(PredictError, match="no scans"):
        predictor.predict_files([], tmp_path / "o")
    assert not predictor.is_open and not (tmp_path / "o").exists()
