"""`uqserve evaluate` / `uqserve calibrate`: known answers through the production metric code.

Core tests feed known per-image predictions (arrays) to ``BundleEvaluation``,
which computes every number with ``uqserve.metrics`` / ``uqserve.uncertainty``.
End-to-end tests run real ONNX bundles (tests/_bundles.py) through
``predict_volume`` on synthetic data and on a user folder written here.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from tests._bundles import make_tiny_bundle
from uqserve import uncertainty as U
from uqserve.bundle import MANIFEST_NAME, BundleError, load_bundle
from uqserve.cli import app
from uqserve.data import make_slice
from uqserve.evaluate import (
    NO_EU,
    PAPER,
    UQSERVE,
    BundleEvaluation,
    EvalImage,
    EvaluationError,
    ImagePrediction,
    SetSpec,
    calibrate,
    evaluate,
    to_convention,
)

VAL = SetSpec("val", "val")
ID_LOW = SetSpec("id-low", "id", ambiguity="low")
ID_HIGH = SetSpec("id-high", "id", ambiguity="high")
OOD = SetSpec("ood-noise-1", "ood", shift="noise", severity=1.0)
SMALL = {
    "n_test": 4,
    "n_val": 4,
    "n_ood": 3,
    "size": (32, 32),
    "shifts": ("noise",),
    "severities": (1.0,),
}


def _images(n: int, seed: int, ambiguity: str = "high", size: int = 32) -> list[EvalImage]:
    out = []
    for i in range(n):
        s = make_slice(seed + i, size=(size, size), ambiguity=ambiguity, num_annotators=4)
        out.append(EvalImage(s.image, s.annotations, f"img{i}", i))
    return out


def _oracle(img: EvalImage) -> ImagePrediction:
    """p̄ = the annotators' mean mask; the samples are the annotators' masks."""
    fg = img.annotations.astype(np.float32).mean(axis=0)
    prob = np.stack([1.0 - fg, fg]).astype(np.float32)
    ent = (
        -(np.where(prob > 0, prob * np.log(np.where(prob > 0, prob, 1)), 0))
        .sum(0)
        .astype(np.float32)
    )
    return ImagePrediction(
        prob=prob, tu=ent, au=ent, eu=np.zeros_like(ent), samples=img.annotations[None].copy()
    )


def _hard(img: EvalImage) -> ImagePrediction:
    """Annotator 0's mask as a hard, over-confident prediction (every sample the same)."""
    y = img.annotations[0]
    prob = np.stack([1.0 - y, y]).astype(np.float32)
    zero = np.zeros(y.shape, np.float32)
    return ImagePrediction(prob=prob, tu=zero, au=zero, eu=zero, samples=np.stack([y] * 4)[None])


def _run_core(predict, sets, *, convention=UQSERVE, n=6, voxels_per_image=4096) -> BundleEvaluation:
    ev = BundleEvaluation(num_classes=2, convention=convention, voxels_per_image=voxels_per_image)
    for img in _images(n, 100):
        ev.add(VAL, img, predict(img, VAL))
    ev.finish_validation()
    for k, spec in enumerate(sets):
        for img in _images(n, 1000 * (k + 1), ambiguity=spec.ambiguity or "high"):
            ev.add(spec, img, predict(img, spec))
    return ev


# ---------------------------------------------------------------------------------- core


def test_oracle_mean_mask_gets_minimal_ged_and_ece() -> None:
    oracle = _run_core(lambda img, spec: _oracle(img), [ID_LOW, ID_HIGH]).summary()["splits"]["id"]
    hard = _run_core(lambda img, spec: _hard(img), [ID_LOW, ID_HIGH]).summary()["splits"]["id"]
    # GED² >= 0 with equality iff the sample distribution equals the annotators'.
    assert abs(oracle["ged2"]) < 1e-9
    # The mean mask's confidence is the share of annotators agreeing with its argmax.
    assert oracle["ece"] < 1e-6
    assert hard["ged2"] > oracle["ged2"] + 0.01
    assert hard["ece"] > oracle["ece"] + 0.01
    assert oracle["hm_iou"] == pytest.approx(1.0)


def _scaled_copy(img: EvalImage, spec: SetSpec) -> ImagePrediction:
    """A model whose EU is 0.4 x its AU (TU = AU + EU): EU carries no signal of its own."""
    x = img.image[0].astype(np.float32)
    # OOD: a washed-out image, so the model is unsure everywhere.
    gain = 2.0 if spec.kind == "ood" else 8.0
    fg = 1.0 / (1.0 + np.exp(-(x - 0.5) * gain))
    prob = np.stack([1 - fg, fg]).astype(np.float32)
    au = (-(prob * np.log(np.clip(prob, 1e-12, 1))).sum(0)).astype(np.float32)
    eu = (0.4 * au).astype(np.float32)
    samples = np.stack([(fg > t).astype(np.uint8) for t in (0.3, 0.5, 0.7)])[None]
    return ImagePrediction(prob=prob, tu=au + eu, au=au, eu=eu, samples=samples)


def test_eu_as_scaled_copy_of_au_is_fully_entangled() -> None:
    ev = _run_core(_scaled_copy, [ID_LOW, ID_HIGH, OOD], n=8)
    delta = ev.summary()["delta"]
    for task in ("ood", "ambiguity", "calibration"):
        assert delta[task] == pytest.approx(0.0, abs=0.02), (task, delta)
    assert delta["rank_correlation"] == pytest.approx(1.0)


def test_summary_holds_what_every_paper_delta_is_computed_from() -> None:
    inversion = SetSpec("ood-inversion-1", "ood", shift="inversion", severity=1.0)
    s = _run_core(_scaled_copy, [ID_LOW, OOD, inversion], n=6).summary()
    d, shifts = s["delta"], s["shifts"]
    # Per-shift AUROCs of AU and EU; the paper's means use its shifts only (here: noise).
    assert set(shifts) == {"noise", "inversion"}
    assert d["auroc_eu_paper"] == shifts["noise"]["auroc_eu"]
    assert d["auroc_au_paper"] == shifts["noise"]["auroc_au"]
    assert d["ood"] == pytest.approx(
        U.ood_delta(shifts["noise"]["auroc_eu"], shifts["noise"]["auroc_au"])
    )
    assert d["paper"]["shifts_used"] == ["noise"] and "inversion" in d["ood_per_shift"]
    amb = d["paper"]["ambiguity"]
    assert amb["ood"]["ncc_au"] == shifts["noise"]["ncc_au"]
    assert amb["id"]["ncc_eu"] == s["splits"]["id"]["ncc_eu"]
    assert d["ambiguity"] == pytest.approx((amb["id"]["delta"] + amb["ood"]["delta"]) / 2)


def test_input_ignoring_model_has_chance_ood_auroc_core() -> None:
    def noise(img: EvalImage, spec: SetSpec) -> ImagePrediction:
        rng = np.random.default_rng([7, zlib.crc32(spec.name.encode()), img.index])
        fg = rng.uniform(0, 1, img.annotations.shape[1:]).astype(np.float32)
        prob = np.stack([1 - fg, fg])
        u = rng.uniform(0, 1, fg.shape).astype(np.float32)
        return ImagePrediction(prob=prob, tu=2 * u, au=u, eu=u * rng.uniform(0.5, 1.5))

    # Predictions from a fixed generator: deterministic, independent of the image and the set.
    s = _run_core(noise, [ID_LOW, ID_HIGH, OOD], n=30).summary()
    for m in ("eu", "au", "tu"):
        assert abs(s["splits"]["ood"][f"auroc_{m}"] - 0.5) < 0.2


def test_paper_convention_maps_and_labels() -> None:
    z = np.zeros((4, 4), np.float32)
    tu, a_s, a_l = z + 1.0, z + 0.25, z + 0.75
    assert to_convention(PAPER, tu=tu, au=tu, eu=z, au_sample=a_s, au_latent=a_l)[1:] == (a_s, a_l)
    assert to_convention(UQSERVE, tu=tu, au=a_s, eu=a_l, au_sample=z, au_latent=z)[1:] == (a_s, a_l)
    # Without an EU method and without samples the Δ scores are undefined, not invented.
    s = _run_core(_scaled_copy, [ID_LOW, OOD], convention=NO_EU).summary()
    assert s["delta"]["mean"] is None and s["convention"] == NO_EU


def test_pooled_voxels_are_bounded_per_image() -> None:
    ev = _run_core(lambda img, spec: _oracle(img), [ID_LOW], n=3, voxels_per_image=100)
    prob, ann, maps = ev.pools["id-low"].arrays()
    assert prob.shape == (2, 300) and ann.shape == (4, 300) and maps.shape == (3, 300)


def test_core_refuses_test_sets_before_validation() -> None:
    ev = BundleEvaluation(num_classes=2)
    img = _images(1, 0)[0]
    with pytest.raises(EvaluationError, match="finish_validation"):
        ev.add(ID_LOW, img, _oracle(img))
    with pytest.raises(EvaluationError, match="2 classes, expected 3"):
        BundleEvaluation(num_classes=3).add(VAL, img, _oracle(img))


def test_safe_is_nan_only_where_a_metric_is_undefined() -> None:
    """Empty or NaN inputs and constant correlations give NaN; a shape bug still raises."""
    from uqserve import metrics as M
    from uqserve import uncertainty as U
    from uqserve.evaluation.core import _safe

    assert _safe(M.auroc, [0.1, 0.2], [0.3]) == pytest.approx(1.0)
    assert math.isnan(_safe(M.auroc, [], [0.3]))  # no ID image
    assert math.isnan(_safe(M.auroc, [0.1, math.nan], [0.3]))  # aggregator not computed
    assert math.isnan(_safe(U.ood_delta, math.nan, 0.7))  # Δ of an undefined AUROC
    assert math.isnan(_safe(U.rank_correlation, [1.0], [2.0], min_size=2))  # one image
    assert math.isnan(_safe(U.rank_correlation, [1.0, 1.0], [2.0, 3.0], min_size=2))  # constant
    probs = np.full((2, 10), 0.5, np.float32)
    with pytest.raises(ValueError, match="do not match"):
        _safe(M.ece, probs, np.zeros((3, 9), np.uint8))  # a shape bug is not "undefined"


# ------------------------------------------------------------------------- end to end


def _input_ignoring_bundle(path: Path) -> Path:
    """A real ONNX bundle whose members zero the image (conv kernel = 0): noise only."""
    folder = make_tiny_bundle(path, au="ssn", eu="ensemble", num_members=2, num_samples=3)
    man = json.loads((folder / MANIFEST_NAME).read_text())
    for member in man["members"]:
        f = folder / member["file"]
        model = onnx.load(str(f))
        for init in model.graph.initializer:
            if init.name == "kernel":
                init.CopyFrom(
                    numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), "kernel")
                )
        data = model.SerializeToString()
        f.write_bytes(data)
        member["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / MANIFEST_NAME).write_text(json.dumps(man))
    return folder


def test_input_ignoring_onnx_bundle_has_chance_ood_auroc(tmp_path: Path) -> None:
    bundle = _input_ignoring_bundle(tmp_path / "blind")
    res = evaluate(
        [bundle], n_test=16, n_val=4, n_ood=16, size=(16, 16), shifts=("inversion", "structures"),
        severities=(1.0,), figures=False,
    )  # fmt: skip
    ood = res["bundles"][0]["results"]["splits"]["ood"]
    for m in ("eu", "au", "tu"):
        assert abs(ood[f"auroc_{m}"] - 0.5) < 0.2, (m, ood[f"auroc_{m}"])


def test_evaluate_synthetic_writes_all_outputs_and_is_reproducible(tmp_path: Path) -> None:
    b1 = make_tiny_bundle(tmp_path / "ssn-ens")
    b2 = make_tiny_bundle(tmp_path / "ssn-none", eu="none", num_members=1, num_samples=3)
    out = tmp_path / "out"
    res = evaluate([b1, b2], "synthetic", out, **SMALL)
    assert {p.name for p in out.iterdir()} == {
        "results.json",
        "results.csv",
        "results.md",
        "figures",
    }
    figs = {p.name for p in (out / "figures").iterdir()}
    for kind in ("reliability", "au_eu", "ood_hist", "samples"):
        assert f"ssn-ens_{kind}.png" in figs and f"ssn-none_{kind}.png" in figs
    assert "summary.png" in figs
    rows = [b["results"] for b in json.loads((out / "results.json").read_text())["bundles"]]
    assert [r["convention"] for r in rows] == [UQSERVE, PAPER]
    for r in rows:
        idm = r["splits"]["id"]
        for key in ("dice", "ece", "ged2", "ged2_paper", "hm_iou", "ncc_au", "ace_tu"):
            assert idm[key] is not None and math.isfinite(idm[key]), key
        assert set(r["sets"]) == {"id-low", "id-high", "ood-noise-1"}
        assert r["delta"]["ood"] is not None
    # The paper's rank scores among the two bundles: ranks 1 and 2 (or 1.5 each on a tie).
    ranks = res["ranks"]
    assert set(ranks) == {"ssn-ens", "ssn-none"}
    for key in ("PERFRANK_auc", "ENTRANK_auc"):
        got = sorted(ranks[n][key] for n in ranks)
        assert got in ([1.0, 2.0], [1.5, 1.5]), (key, got)
    md = (out / "results.md").read_text()
    assert "ssn-none ¹" in md and "paper convention" in md
    assert "AUROC EU (paper shifts)" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "bundle,combination,convention,scope,name,metric,value"
    # Same data + seed -> the same numbers.
    again = evaluate([b1, b2], "synthetic", None, **SMALL, figures=False)
    assert [b["results"] for b in again["bundles"]] == [b["results"] for b in res["bundles"]]


def _write_case(folder: Path, seed: int, *, annotators: int = 3, label_shift: int = 0) -> None:
    s = make_slice(seed, size=(32, 32), ambiguity="high", num_annotators=annotators)
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(s.image[0][:, :, None], np.eye(4)), str(folder / "image.nii.gz"))
    for a in range(annotators):
        lab = (s.annotations[a] + label_shift * (s.annotations[a] > 0)).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab[:, :, None], np.eye(4)), str(folder / f"label_r{a}.nii.gz"))


@pytest.mark.slow  # the CLI over a folder of annotated cases (the Python route stays fast)
def test_cli_evaluate_on_a_user_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(8):
        _write_case(data / f"case_{i:02d}", 50 + i)
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "eval"
    args = ["evaluate", str(bundle), "--data", str(data), "--out", str(out), "--quiet"]
    args += ["--shift", "blur", "--severity", "1.0", "--n-ood", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["source"] == "folder" and res["data"]["n_images"] == 8
    sets = res["bundles"][0]["results"]["sets"]
    assert sets["id"]["n_images"] == 6 and sets["ood-blur-1"]["n_images"] == 4
    assert (out / "figures" / "b_samples.png").stat().st_size > 0
    # An existing output folder is not overwritten silently.
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0 and "--overwrite" in r.output


@pytest.mark.parametrize("problem", ["classes", "no-annotations"])
def test_cli_evaluate_refuses_bad_folders_with_one_line(tmp_path: Path, problem: str) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _write_case(data / f"case_{i}", i, label_shift=1 if problem == "classes" and i == 1 else 0)
    if problem == "no-annotations":
        for f in (data / "case_2").glob("label_*"):
            f.unlink()
    bundle = make_tiny_bundle(tmp_path / "b")
    out = tmp_path / "eval"
    r = CliRunner().invoke(
        app, ["evaluate", str(bundle), "--data", str(data), "--out", str(out), "-q"]
    )
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    expected = "case_1" if problem == "classes" else "case_2"
    assert expected in lines[0] and ("2 classes" in lines[0] or "label" in lines[0])
    assert not out.exists()


def test_calibrate_writes_a_new_manifest_version(tmp_path: Path) -> None:
    from uqserve.prediction import predict_volume
    from uqserve.volumes import Volume

    bundle = make_tiny_bundle(tmp_path / "b")
    before = (bundle / MANIFEST_NAME).read_text()
    man = calibrate(bundle, **SMALL)
    assert man.manifest_version == 2
    assert (bundle / "manifest.v1.json").read_text() == before
    loaded = load_bundle(bundle)  # checksums verified
    assert loaded.manifest == man
    assert man.ood.aggregator == man.default_aggregator
    assert man.ood.threshold == pytest.approx(np.quantile(man.ood.validation_scores, 0.95))
    by_agg = man.validation["ood_auroc_eu_by_aggregator"]
    best = max(v for v in by_agg.values() if v is not None)
    assert by_agg[man.default_aggregator] == best
    assert set(man.validation["thresholds"]) >= {"tu", "au", "eu", "au_sample", "au_latent"}
    for key in ("delta_ood", "delta_ambiguity", "delta_calibration", "delta_mean"):
        assert math.isfinite(man.entanglement[key])
    # predict reports the recorded entanglement.
    vol = Volume(
        data=make_slice(3, size=(32, 32)).image[0][:, :, None], affine=np.eye(4), source="x"
    )
    report = predict_volume(vol, loaded).report
    assert report["entanglement"]["bundle"] == man.entanglement
    # A second calibration keeps version 2 as a backup.
    calibrate(bundle, **SMALL)
    assert json.loads((bundle / "manifest.v2.json").read_text())["manifest_version"] == 2


def test_calibrate_refuses_an_altered_member(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    shutil.copy(bundle / "member_1.onnx", bundle / "member_0.onnx")
    with pytest.raises(BundleError, match="checksum"):
        calibrate(bundle, **SMALL)
    assert not (bundle / "manifest.v1.json").exists()


def test_foreground_aggregator_gets_the_members_foreground(tiny_bundle: Path) -> None:
    """evaluate's ``foreground`` aggregator scores over where some member saw foreground.

    It read a field predictions did not have, so the map was always missing and
    every ``foreground`` score NaN.
    """
    from tests.conftest import blob_volume
    from uqserve.evaluation.runner import image_to_volume, predict_image
    from uqserve.evaluation.sets import EvalImage
    from uqserve.prediction import Predictor

    bundle = load_bundle(tiny_bundle)
    image = blob_volume((40, 36, 1))[:, :, 0][None]  # [1, H, W]
    img = EvalImage(image, np.zeros((1, 40, 36), np.uint8), "blob", 0)
    with Predictor(bundle) as predictor:
        pred: ImagePrediction = predict_image(img, predictor, seed=3, convention="uqserve")
        volume_pred = predictor.predict(image_to_volume(image, "blob"), seed=3)
    fg = pred.member_foreground
    assert fg is not None and fg.shape == (40, 36) and fg.dtype == bool
    assert 0 < fg.sum() < fg.size  # the blob, not everything or nothing
    # Two classes: where the mean's argmax is foreground, some member's is too.
    seg = np.argmax(pred.prob, axis=0)
    assert np.all(fg[seg > 0])
    assert volume_pred.member_foreground is not None
    assert np.array_equal(fg, volume_pred.member_foreground[:, :, 0])
    score = U.image_score(pred.eu, "foreground", member_foreground=fg)
    assert math.isfinite(score)
