"""An nnU-Net v2 3d_fullres model: `uqserve predict` vs `nnUNetPredictor`, same CPU; prints JSON.

    .venv/bin/python benchmarks/bench_nnunet.py [--size 128] [--folds 1] [--threads 2] [--tiny]

nnU-Net itself plans a synthetic dataset of ``--size``³ cases at 1 mm (its
default planner and network for that size; ``--tiny`` shrinks the network to
three stages of 4-16 features, for a quick check of the script), writes fold
checkpoints of freshly initialised networks with its trainer (speed does not
depend on the weights), and predicts one ``--size``³ case with
``nnUNetPredictor`` (files in, segmentation and probabilities out; mirroring
off). uqserve exports the same folds (``export --nnunet``, mirroring off) and
predicts the same file with ``uqserve.predict`` (segmentation, probabilities,
TU/AU/EU maps and report.json out). Both run on the CPU with ``--threads``
threads. Reported: both wall times, uqserve's stages from report.json, and
its extra work over nnU-Net: the uncertainty maps (the ``scores_s`` stage and
the writing of the TU/AU/EU maps), which nnU-Net does not compute. Needs the
``export`` and ``nnunet`` extras.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dataset(root: Path, size: int, n_train: int = 2) -> tuple[str, Path]:
    """A raw dataset of ``size``³ cases (MR-style) and one test case."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    name = "Dataset990_bench"
    raw = root / "raw" / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    tests = root / "test"
    tests.mkdir()
    rng = np.random.default_rng(990)
    affine = np.eye(4)
    for i in range(n_train + 1):
        field = gaussian_filter(rng.normal(size=(size,) * 3), sigma=4.0).astype(np.float32)
        image = 300.0 + 80.0 * field / field.std()
        if i < n_train:
            nib.save(
                nib.Nifti1Image(image, affine), str(raw / "imagesTr" / f"b_{i:03d}_0000.nii.gz")
            )
            label = (field > 0).astype(np.uint8)
            nib.save(nib.Nifti1Image(label, affine), str(raw / "labelsTr" / f"b_{i:03d}.nii.gz"))
        else:
            nib.save(nib.Nifti1Image(image, affine), str(tests / "case_000_0000.nii.gz"))
    dataset = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))
    return name, tests


def _plan(root: Path, name: str, tiny: bool) -> dict[str, Any]:
    """nnU-Net's plans for the dataset (3d_fullres preprocessed: the trainer needs it)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([990], num_processes=1, verbose=False, show_progress_bar=False)
    plans_name = plan_experiments([990])
    path = root / "preprocessed" / name / f"{plans_name}.json"
    plans: dict[str, Any] = json.loads(path.read_text())
    if tiny:
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        arch.update(
            n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3,
            strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1],
            n_conv_per_stage_decoder=[1, 1],
        )  # fmt: skip
        path.write_text(json.dumps(plans, indent=2))
    preprocess([990], plans_name, configurations=("3d_fullres",), num_processes=(1,))
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="case size, voxels per axis")
    ap.add_argument("--folds", type=int, default=1, help="folds (members), 1..5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny network (script check)")
    args = ap.parse_args()
    # nnU-Net prints its progress on stdout: keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        result = _run(args)
    print(json.dumps(result, indent=2))


def _run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_nnunet_") as tmp:
        root = Path(tmp)
        for var in ("raw", "preprocessed", "results"):
            os.environ[f"nnUNet_{var}"] = str(root / var)
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        import torch

        torch.set_num_threads(args.threads)
        from tests._nnunet_reference import predict as nnunet_predict
        from tests._nnunet_reference import write_checkpoints

        name, tests = _dataset(root, args.size)
        plans = _plan(root, name, args.tiny)
        folds = tuple(range(args.folds))
        model_dir = write_checkpoints(root, name, plans, "3d_fullres", folds)
        conf = plans["configurations"]["3d_fullres"]

        t0 = time.perf_counter()
        nnunet_predict(model_dir, tests, root / "pred_nnunet", folds, mirror=False)
        nnunet_s = time.perf_counter() - t0

        import uqserve
        from uqserve.exporting import export_nnunet

        t0 = time.perf_counter()
        bundle = export_nnunet(model_dir, root / "bundle", folds=[str(f) for f in folds])
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = uqserve.predict(
            [tests / "case_000_0000.nii.gz"], out_dir=root / "pred_uqserve", bundle=bundle,
            device="cpu",
        )[0]  # fmt: skip
        uqserve_s = time.perf_counter() - t0
        if not result.ok or result.report is None:
            raise SystemExit(f"uqserve predict failed: {result.error}")
        timings = dict(result.report.get("timings", {}))
    return {
        "case": [args.size] * 3,
        "configuration": "3d_fullres",
        "patch_size": conf["patch_size"],
        "features_per_stage": conf["architecture"]["arch_kwargs"]["features_per_stage"],
        "folds": args.folds,
        "mirroring": False,
        "threads": args.threads,
        "nnunet_predict_s": round(nnunet_s, 3),
        "uqserve_export_s": round(export_s, 3),
        "uqserve_predict_s": round(uqserve_s, 3),
        "uqserve_over_nnunet": round(uqserve_s / nnunet_s, 3),
        "uqserve_stages_s": timings,
        "uqserve_extra_work": "TU/AU/EU maps, image scores, OOD, volume intervals "
        "(scores_s) and their files (part of write_s)",
    }


if __name__ == "__main__":
    main()
