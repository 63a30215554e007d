"""nnU-Net v2's own pipeline on tiny synthetic datasets: the reference of test_nnunet_parity.

Run as a script (``python tests/_nnunet_reference.py ROOT``) so that nnU-Net's
``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` variables, read when
nnunetv2 is imported, point into ``ROOT``. For each dataset it

1. writes a raw dataset (``imagesTr``, ``labelsTr``, ``dataset.json``) and
   three test cases: one smaller than the patch in some axes (nnU-Net pads it),
   one larger than the patch in every axis (several overlapping windows), one
   at a finer spacing in a frame of zeros (cropped to the nonzero box, then
   resampled);
2. runs nnU-Net's fingerprint extraction and experiment planning, then makes
   the 2d and 3d_fullres configurations tiny (small patches, three stages,
   few features);
3. writes fold checkpoints of networks as nnU-Net's trainer initialises them
   (no training), plus randomised biases and norm affine parameters and the
   last layer scaled by a fixed factor, so that probabilities are far from 0.5;
4. predicts the test cases with ``nnUNetPredictor`` on the CPU, probabilities
   saved, for several fold/mirroring settings;

and writes ``ROOT/reference.json``: the model folders, test images and
prediction folders.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

#: name -> (id, channel name, training shape [X, Y, Z], spacing mm, intensity offset,
#: scale, x axis stored flipped)
DATASETS = {
    # MR-style: z-score, stored LAS; thick z, so nnU-Net's transpose_forward is the identity.
    "mr": (901, "MRI", (40, 48, 12), (1.0, 1.0, 3.0), 300.0, 80.0, True),
    # CT-style: CT normalisation; thick x, so transpose_forward is [2, 0, 1].
    "ct": (902, "CT", (10, 40, 48), (4.0, 1.0, 1.0), 40.0, 400.0, False),
}
#: Patches in nnU-Net's (transposed) axis order: 3d_fullres and 2d.
PATCH_3D, PATCH_2D = (8, 32, 32), (32, 32)
#: Test cases [X, Y, Z] per dataset: smaller than the 3d and 2d patches in some axes
#: (and larger in another), and larger than the patch in every axis.
CASES = {
    "mr": {"small": (24, 40, 6), "large": (44, 52, 14)},
    "ct": {"small": (6, 24, 40), "large": (12, 44, 52)},
}
#: The crop-and-resample case: this shape at 0.8x the training spacing in-plane,
#: 1.25x along the thick axis.
FINE_SHAPE = {"mr": (36, 44, 10), "ct": (10, 40, 44)}
CONFIGURATIONS = ("2d", "3d_fullres")
#: run -> (configuration, folds, mirroring, test cases)
RUNS = {
    "2d_fold0": ("2d", (0,), False, ("small", "large")),
    "2d_folds01": ("2d", (0, 1), False, ("small", "large")),
    "2d_fold0_mirror": ("2d", (0,), True, ("small", "large")),
    "3d_fold0": ("3d_fullres", (0,), False, ("small", "large")),
    "3d_folds01": ("3d_fullres", (0, 1), False, ("small", "large")),
    "3d_fold0_mirror": ("3d_fullres", (0,), True, ("small", "large")),
    "2d_fold0_cropped": ("2d", (0,), False, ("cropped",)),
    "3d_fold0_cropped": ("3d_fullres", (0,), False, ("cropped",)),
}
N_TRAIN = 4
#: Test images: a smooth random field (Gaussian sigma, voxels) plus a little white
#: noise (fraction of the intensity scale).
SMOOTH, NOISE = 2.0, 0.02
#: The last layer's weights are multiplied by this (logits of a few units; its
#: random bias is left as drawn, so that neither class swamps the other).
LAST_LAYER_SCALE = 6.0


def _case(rng: np.random.Generator, shape: tuple[int, ...], offset: float, scale: float):
    """A smooth random image (no zero voxel: nnU-Net crops nothing) and its label map."""
    field = gaussian_filter(rng.normal(size=shape), sigma=SMOOTH)
    field /= field.std()
    image = offset + scale * field + NOISE * scale * rng.normal(size=shape)
    label = (field > 0.3).astype(np.uint8)
    return image.astype(np.float32), label


def _save(array: np.ndarray, spacing: tuple[float, ...], path: Path, flip: bool) -> None:
    """A NIfTI file; ``flip``: the x axis stored right to left (LAS)."""
    affine = np.diag([-spacing[0] if flip else spacing[0], *spacing[1:], 1.0])
    img = nib.Nifti1Image(array, affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))


def write_raw(root: Path, key: str) -> tuple[str, dict[str, str]]:
    """The raw dataset and the test images of ``key``; returns (dataset name, case -> file)."""
    ident, channel, shape, spacing, offset, scale, flip = DATASETS[key]
    name = f"Dataset{ident}_{key}tiny"
    raw = root / "raw" / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(ident)
    for i in range(N_TRAIN):
        image, label = _case(rng, shape, offset, scale)
        _save(image, spacing, raw / "imagesTr" / f"{key}_{i:03d}_0000.nii.gz", flip)
        _save(label, spacing, raw / "labelsTr" / f"{key}_{i:03d}.nii.gz", flip)
    files = {}
    for case, case_shape in CASES[key].items():
        folder = root / f"test_{key}_{case}"
        folder.mkdir()
        image, _ = _case(rng, case_shape, offset, scale)
        files[case] = str(folder / f"{key}{case}_000_0000.nii.gz")
        _save(image, spacing, Path(files[case]), flip)
    # A case at 0.8x the training spacing in-plane and 1.25x along the thick axis
    # (resampled nearest there: nnU-Net's separate z), in a frame of zeros (one zero
    # slice along the thick axis): nnU-Net crops it to the nonzero box before
    # normalising, resamples it to the training grid and back.
    fine = tuple(1.25 * v if v > 1.0 else 0.8 * v for v in spacing)
    folder = root / f"test_{key}_cropped"
    folder.mkdir()
    image, _ = _case(rng, FINE_SHAPE[key], offset, scale)
    thick, frames = int(np.argmax(spacing)), [(3, 6), (5, 2)]
    pad = [(1, 0) if a == thick else frames.pop(0) for a in range(3)]
    files["cropped"] = str(folder / f"{key}cropped_000_0000.nii.gz")
    _save(np.pad(image, pad), fine, Path(files["cropped"]), flip)
    dataset = {
        "channel_names": {"0": channel},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": N_TRAIN,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))
    return name, files


def plan(root: Path, key: str, name: str) -> dict:
    """nnU-Net's fingerprint and plans, then tiny 2d and 3d_fullres configurations."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    ident = DATASETS[key][0]
    extract_fingerprints([ident], num_processes=1, verbose=False, show_progress_bar=False)
    plans_name = plan_experiments([ident])
    path = root / "preprocessed" / name / f"{plans_name}.json"
    plans = json.loads(path.read_text())
    for conf_name, patch in (("2d", PATCH_2D), ("3d_fullres", PATCH_3D)):
        conf = plans["configurations"][conf_name]
        conf["patch_size"] = list(patch)
        conf["batch_size"] = 2
        first = [1] * len(patch) if conf_name == "2d" else [1, 3, 3]
        pool = [1, 2, 2][-len(patch) :]
        conf["architecture"]["arch_kwargs"].update(
            n_stages=3,
            features_per_stage=[4, 8, 16],
            kernel_sizes=[[3] * len(patch) if conf_name == "2d" else first, [3] * len(patch),
                          [3] * len(patch)],
            strides=[[1] * len(patch), pool, pool],
            n_conv_per_stage=[1, 1, 1],
            n_conv_per_stage_decoder=[1, 1],
        )  # fmt: skip
    plans["configurations"].pop("3d_lowres", None)
    path.write_text(json.dumps(plans, indent=2))
    preprocess(
        [ident], plans_name, configurations=CONFIGURATIONS, num_processes=(1, 1), verbose=False
    )
    return plans


def write_checkpoints(
    root: Path, name: str, plans: dict, configuration: str, folds: tuple[int, ...]
) -> Path:
    """Fold checkpoints of untrained, randomised networks; returns the model folder."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch import nn

    dataset_json = json.loads((root / "raw" / name / "dataset.json").read_text())
    model_dir = None
    for fold in folds:
        # run_training's way of saying "fresh start" (the trainer pops the key).
        fresh = {**plans, "continue_training": False}
        torch.manual_seed(1000 + fold)  # the trainer's initialisation draws from torch's RNG
        trainer = nnUNetTrainer(
            fresh, configuration, fold, dataset_json, device=torch.device("cpu")
        )
        trainer.initialize()
        torch.manual_seed(1000 + fold)
        with torch.no_grad():
            # The trainer's He initialisation, plus random biases and norm affine
            # parameters (a trained network's are not 0 and 1).
            for mod in trainer.network.modules():
                convs = nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d
                if isinstance(mod, convs) and mod.bias is not None:
                    mod.bias.normal_(0.0, 0.2)
                if isinstance(mod, nn.InstanceNorm2d | nn.InstanceNorm3d) and mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0.0, 0.3)
            last = trainer.network.decoder.seg_layers[-1]
            last.weight.mul_(LAST_LAYER_SCALE)
        mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
        trainer.inference_allowed_mirroring_axes = mirror_axes
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
        model_dir = Path(trainer.output_folder_base)
    assert model_dir is not None
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    shutil.copy(root / "raw" / name / "dataset.json", model_dir / "dataset.json")
    return model_dir


def predict(
    model_dir: Path, tests: list[list[str]], out: Path, folds: tuple[int, ...], mirror: bool
) -> None:
    """nnU-Net's predictor on the CPU, probabilities saved (``.npz``, SimpleITK axis order)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirror,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), folds, "checkpoint_final.pth")
    out.mkdir(parents=True, exist_ok=True)
    outputs = [str(out / Path(t[0]).name.replace("_0000.nii.gz", "")) for t in tests]
    predictor.predict_from_files_sequential(tests, outputs, save_probabilities=True)


def main(root: Path) -> None:
    import torch

    torch.set_num_threads(1)
    summary = {}
    for key in DATASETS:
        name, files = write_raw(root, key)
        plans = plan(root, key, name)
        models = {c: str(write_checkpoints(root, name, plans, c, (0, 1))) for c in CONFIGURATIONS}
        runs = {}
        for run, (configuration, folds, mirror, cases) in RUNS.items():
            out = root / f"pred_{key}_{run}"
            tests = [files[c] for c in cases]
            predict(Path(models[configuration]), [[t] for t in tests], out, folds, mirror)
            runs[run] = {
                "tests": tests,
                "model_dir": models[configuration],
                "folds": list(folds),
                "mirror": mirror,
                "out": str(out),
            }
        summary[key] = {
            "model_dir": models["2d"],
            "files": files,
            "runs": runs,
            "transpose_forward": plans["transpose_forward"],
        }
    (root / "reference.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve()
    for var, sub in (("raw", "raw"), ("preprocessed", "preprocessed"), ("results", "results")):
        os.environ[f"nnUNet_{var}"] = str(root / sub)
    main(root)
