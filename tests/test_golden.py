"""Golden maps: predict must keep giving bit-identical outputs for the same scan and seed.

The goldens in ``tests/golden/predict.npz`` were recorded from the predict code
before it was split into pipeline steps; any later change to predict that
alters one bit of a map or a report number fails here. Cases:

- the shipped example scan (``examples/example.nii.gz``) through both shipped
  bundles, via ``uqserve.predict`` (files written, read back);
- a real MRI from nibabel's test data (``anatomical.nii``, 33 x 41 x 25
  big-endian int16) through the SSN bundle, via files and via
  ``predict_volume(want_samples=True)`` (AU parts, sample counts and labels);
- the same MRI stored with its largest spacing on the first axis, so that
  predict slices along axis 0 and has to move axes back.

For each array the golden holds the sha256 of its bytes (with dtype and
shape), its float64 sum and max, and the exact values at up to 1,024 evenly
spaced voxels, so a failure shows how far the maps moved, not only that they
did. Reports are compared whole, minus timings and paths.

The goldens depend on the shipped bundles: when a bundle is retrained on
purpose, record them again with ``python -m tests.test_golden`` and say so in
the commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden") / "predict.npz"
EXAMPLE = ROOT / "examples" / "example.nii.gz"
MRI = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
MAPS = ("seg", "prob", "tu", "au", "eu")
N_PICKS = 1024


def _mri_axis0(tmp: Path) -> Path:
    """anatomical.nii with axes (Z, X, Y) and spacing (4, 2, 2): predict slices along axis 0."""
    img = nib.load(MRI)
    data = np.transpose(np.asanyarray(img.dataobj), (2, 0, 1))
    affine = np.diag([4.0, 2.0, 2.0, 1.0])
    out = nib.Nifti1Image(data, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    path = tmp / "mri_axis0.nii.gz"
    nib.save(out, path)
    return path


def _clean_report(report: dict[str, Any], *, keep_sha: bool) -> dict[str, Any]:
    """The report without what legitimately varies: timings, paths, version."""
    rep = json.loads(json.dumps(report))
    rep.pop("timings", None)
    rep.pop("uqserve_version", None)
    rep.pop("outputs", None)
    if not keep_sha:
        rep["scan"].pop("sha256", None)
    return rep


def compute(tmp: Path) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """Run every case; returns ``(arrays by "case/name", cleaned reports by case)``."""
    import uqserve
    from uqserve.volumes import read_volume

    arrays: dict[str, npt.NDArray[Any]] = {}
    reports: dict[str, Any] = {}
    file_cases = [
        ("example-softmax", EXAMPLE, "softmax-ensemble", True),
        ("example-ssn", EXAMPLE, "ssn-ensemble", True),
        ("mri-ssn", MRI, "ssn-ensemble", True),
        ("mri-axis0-softmax", _mri_axis0(tmp), "softmax-ensemble", False),
    ]
    for case, scan, bundle, keep_sha in file_cases:
        [res] = uqserve.predict([scan], tmp / case, bundle)
        assert res.ok and res.out_dir is not None and res.report is not None, res.error
        for name in MAPS:
            img = nib.load(res.out_dir / f"{name}.nii.gz")
            arrays[f"{case}/{name}"] = np.asanyarray(img.dataobj)
            arrays[f"{case}/{name}.affine"] = img.affine
        reports[case] = _clean_report(res.report, keep_sha=keep_sha)
    for case, scan, bundle in [
        ("mri-ssn-samples", MRI, "ssn-ensemble"),
        ("mri-axis0-samples", _mri_axis0(tmp), "ssn-ensemble"),
    ]:
        pred = uqserve.predict_volume(read_volume(scan), bundle, want_samples=True)
        for name in (*MAPS, "au_sample", "au_latent", "sample_counts", "sample_labels"):
            arrays[f"{case}/{name}"] = getattr(pred, name)
        reports[case] = _clean_report(pred.report, keep_sha=False)
    return arrays, reports


def _digest(a: npt.NDArray[Any]) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _picks(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    flat = np.ascontiguousarray(a).reshape(-1)
    return flat[np.linspace(0, flat.size - 1, min(N_PICKS, flat.size)).astype(np.int64)]


def _summary(arrays: dict[str, npt.NDArray[Any]], reports: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"__reports__": np.array(json.dumps(reports, sort_keys=True))}
    for key, a in arrays.items():
        out[f"{key}#sha256"] = np.array(_digest(a))
        out[f"{key}#stats"] = np.array([a.astype(np.float64).sum(), a.max()], np.float64)
        out[f"{key}#picks"] = _picks(a)
    return out


def write_goldens(path: Path = GOLDEN) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        summary = _summary(*compute(Path(tmp)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **summary)


def _differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        problems.append(f"arrays differ: extra {extra}, missing {missing}")
    for key in sorted(k for k in want if k.endswith("#sha256") and k in got):
        name = key.removesuffix("#sha256")
        if str(got[key]) == str(want[key]):
            continue
        g, w = got[f"{name}#picks"], want[f"{name}#picks"]
        if g.shape != w.shape or g.dtype != w.dtype:
            problems.append(f"{name}: dtype/shape {g.dtype}{g.shape} != golden {w.dtype}{w.shape}")
            continue
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        gs, ws = got[f"{name}#stats"], want[f"{name}#stats"]
        problems.append(
            f"{name}: bytes differ; max |diff| over {g.size} sampled voxels {diff.max():.3g} "
            f"({int((diff > 0).sum())} differ); sum {gs[0]!r} vs golden {ws[0]!r}, "
            f"max {gs[1]!r} vs {ws[1]!r}"
        )
    got_rep = json.loads(str(got["__reports__"]))
    want_rep = json.loads(str(want["__reports__"]))
    for case in sorted(want_rep):
        if got_rep.get(case) != want_rep[case]:
            problems.append(
                f"report {case} differs:\n  got    {json.dumps(got_rep.get(case), sort_keys=True)}"
                f"\n  golden {json.dumps(want_rep[case], sort_keys=True)}"
            )
    return problems


def test_predict_maps_match_goldens(tmp_path: Path) -> None:
    want = dict(np.load(GOLDEN))
    reports = json.loads(str(want["__reports__"]))
    from uqserve.bundle import load_bundle

    for case, rep in reports.items():
        sha = load_bundle(rep["bundle"]["name"]).manifest_sha256
        if sha != rep["bundle"]["manifest_sha256"]:
            pytest.fail(
                f"shipped bundle {rep['bundle']['name']} changed since the goldens were "
                f"recorded (case {case}); if that is intended, record them again with "
                "`python -m tests.test_golden` and say so in the commit"
            )
    got = _summary(*compute(tmp_path))
    problems = _differences(got, want)
    assert not problems, "predict outputs moved from the goldens:\n" + "\n".join(problems)


if __name__ == "__main__":
    write_goldens()
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
