"""nnU-Net v2's own pipeline on tiny synthetic datasets: the reference of test_nnunet_parity.

Run as a script (``python tests/_nnunet_reference.py ROOT``) so that nnU-Net's
``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` variables, read when
nnunetv2 is imported, point into ``ROOT``. For each dataset it

1. writes a raw dataset (``imagesTr``, ``labelsTr``, ``dataset.json``) and test cases;
2. runs nnU-Net's fingerprint extraction and experiment planning, then makes
   the 2d configuration tiny (patch = one slice, three stages, few features);
3. writes fold checkpoints of freshly initialised networks with nnU-Net's
   trainer (no training): biases and norms randomised and the last layer
   scaled, so that probabilities are far from 0.5;
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

#: name -> (id, channel name, shape [X, Y, Z], spacing mm, intensity offset, scale)
DATASETS = {
    # MR-style: z-score; thick z, so nnU-Net's transpose_forward is the identity.
    "mr": (901, "MRI", (32, 48, 5), (1.0, 1.0, 3.0), 300.0, 80.0),
    # CT-style: CT normalisation; thick x, so transpose_forward is [2, 0, 1].
    "ct": (902, "CT", (5, 32, 48), (4.0, 1.0, 1.0), 40.0, 400.0),
}
RUNS = {"fold0": ((0,), False), "folds01": ((0, 1), False), "fold0_mirror": ((0,), True)}
N_TRAIN, N_TEST = 4, 2


def _case(rng: np.random.Generator, shape: tuple[int, ...], offset: float, scale: float):
    """A smooth random image (no zero voxel: nnU-Net crops nothing) and its label map."""
    field = gaussian_filter(rng.normal(size=shape), sigma=(2.0, 2.0, 2.0))
    field /= field.std()
    image = offset + scale * field + 0.1 * scale * rng.normal(size=shape)
    label = (field > 0.3).astype(np.uint8)
    return image.astype(np.float32), label


def _save(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))


def write_raw(root: Path, key: str) -> tuple[str, list[str]]:
    """The raw dataset and the test images of ``key``; returns (dataset name, test files)."""
    ident, channel, shape, spacing, offset, scale = DATASETS[key]
    name = f"Dataset{ident}_{key}tiny"
    raw = root / "raw" / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    tests = root / f"test_{key}"
    tests.mkdir()
    rng = np.random.default_rng(ident)
    for i in range(N_TRAIN):
        image, label = _case(rng, shape, offset, scale)
        _save(image, spacing, raw / "imagesTr" / f"{key}_{i:03d}_0000.nii.gz")
        _save(label, spacing, raw / "labelsTr" / f"{key}_{i:03d}.nii.gz")
    files = []
    for i in range(N_TEST):
        image, _ = _case(rng, shape, offset, scale)
        _save(image, spacing, tests / f"{key}test_{i:03d}_0000.nii.gz")
        files.append(str(tests / f"{key}test_{i:03d}_0000.nii.gz"))
    dataset = {
        "channel_names": {"0": channel},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": N_TRAIN,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))
    return name, files


def plan(root: Path, key: str, name: str) -> dict:
    """nnU-Net's fingerprint and plans, then a tiny 2d configuration (patch = one slice)."""
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
    tf = plans["transpose_forward"]
    shape = [DATASETS[key][2][2 - a] for a in range(3)]  # SimpleITK order [z, y, x]
    slice_shape = [shape[a] for a in tf][1:]
    conf = plans["configurations"]["2d"]
    conf["patch_size"] = slice_shape
    conf["batch_size"] = 2
    arch = conf["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=3,
        features_per_stage=[4, 8, 16],
        kernel_sizes=[[3, 3]] * 3,
        strides=[[1, 1], [2, 2], [2, 2]],
        n_conv_per_stage=[1, 1, 1],
        n_conv_per_stage_decoder=[1, 1],
    )
    path.write_text(json.dumps(plans, indent=2))
    preprocess([ident], plans_name, configurations=("2d",), num_processes=(1,), verbose=False)
    return plans


def _training_slices(root: Path, name: str, plans: dict) -> np.ndarray:
    """The first training image as nnU-Net's 2d network sees it: ``[slices, 1, a, b]``."""
    first = sorted((root / "raw" / name / "imagesTr").iterdir())[0]
    arr = np.asarray(nib.load(str(first)).dataobj, dtype=np.float32).transpose(2, 1, 0)
    arr = arr.transpose(plans["transpose_forward"])
    scheme = plans["configurations"]["2d"]["normalization_schemes"][0]
    if scheme == "CTNormalization":
        props = plans["foreground_intensity_properties_per_channel"]["0"]
        arr = np.clip(arr, props["percentile_00_5"], props["percentile_99_5"])
        arr = (arr - props["mean"]) / props["std"]
    else:
        arr = (arr - arr.mean()) / arr.std()
    return arr[:, np.newaxis].astype(np.float32)


def _balance(network, slices: np.ndarray) -> None:
    """Shift the last layer's biases so that about half the training voxels are foreground."""
    import torch

    network.eval()
    out = network(torch.from_numpy(slices))
    out = out[0] if isinstance(out, list | tuple) else out
    shift = float(torch.median(out[:, 1] - out[:, 0]))
    last = network.decoder.seg_layers[-1]
    last.bias[0] += shift / 2
    last.bias[1] -= shift / 2


def write_checkpoints(root: Path, name: str, plans: dict, folds: tuple[int, ...]) -> Path:
    """Fold checkpoints of randomised, untrained networks; returns the model folder."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch import nn

    dataset_json = json.loads((root / "raw" / name / "dataset.json").read_text())
    model_dir = None
    for fold in folds:
        # run_training's way of saying "fresh start" (the trainer pops the key).
        fresh = {**plans, "continue_training": False}
        trainer = nnUNetTrainer(fresh, "2d", fold, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        torch.manual_seed(1000 + fold)
        with torch.no_grad():
            for mod in trainer.network.modules():
                if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d) and mod.bias is not None:
                    mod.bias.normal_(0.0, 0.2)
                if isinstance(mod, nn.InstanceNorm2d) and mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0.0, 0.3)
            # Opposite logits for the two classes (no common mode, which would
            # only inflate nnU-Net's float16 rounding), scaled far from p = 0.5.
            last = trainer.network.decoder.seg_layers[-1]
            last.weight[1] = -last.weight[0]
            last.weight.mul_(6.0)
            last.bias.zero_()
            _balance(trainer.network, _training_slices(root, name, plans))
        mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
        trainer.inference_allowed_mirroring_axes = mirror_axes
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
        model_dir = Path(trainer.output_folder_base)
    assert model_dir is not None
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    shutil.copy(root / "raw" / name / "dataset.json", model_dir / "dataset.json")
    return model_dir


def predict(model_dir: Path, tests: Path, out: Path, folds: tuple[int, ...], mirror: bool) -> None:
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
    predictor.predict_from_files_sequential(str(tests), str(out), save_probabilities=True)


def main(root: Path) -> None:
    import torch

    torch.set_num_threads(1)
    summary = {}
    for key in DATASETS:
        name, tests = write_raw(root, key)
        plans = plan(root, key, name)
        model_dir = write_checkpoints(root, name, plans, (0, 1))
        runs = {}
        for run, (folds, mirror) in RUNS.items():
            out = root / f"pred_{key}_{run}"
            predict(model_dir, root / f"test_{key}", out, folds, mirror)
            runs[run] = {"folds": list(folds), "mirror": mirror, "out": str(out)}
        summary[key] = {
            "model_dir": str(model_dir),
            "tests": tests,
            "runs": runs,
            "transpose_forward": plans["transpose_forward"],
        }
    (root / "reference.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve()
    for var, sub in (("raw", "raw"), ("preprocessed", "preprocessed"), ("results", "results")):
        os.environ[f"nnUNet_{var}"] = str(root / sub)
    main(root)
