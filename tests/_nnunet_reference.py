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
CONFIGURATIONS = ("2d", "3d_fullres")
#: run -> (configuration, folds, mirroring, test folder suffix)
RUNS = {
    "fold0": ("2d", (0,), False, ""),
    "folds01": ("2d", (0, 1), False, ""),
    "fold0_mirror": ("2d", (0,), True, ""),
    "3d_fold0": ("3d_fullres", (0,), False, ""),
    "3d_folds01_mirror": ("3d_fullres", (0, 1), True, ""),
    "fold0_resampled": ("2d", (0,), False, "_resampled"),
    "3d_fold0_resampled": ("3d_fullres", (0,), False, "_resampled"),
    "fold0_cropped": ("2d", (0,), False, "_cropped"),
    "3d_fold0_cropped": ("3d_fullres", (0,), False, "_cropped"),
}
N_TRAIN, N_TEST = 4, 2
#: Test images: a smooth random field (Gaussian sigma, voxels) plus a little white
#: noise (fraction of the intensity scale).
SMOOTH, NOISE = 2.0, 0.02


def _case(rng: np.random.Generator, shape: tuple[int, ...], offset: float, scale: float):
    """A smooth random image (no zero voxel: nnU-Net crops nothing) and its label map."""
    field = gaussian_filter(rng.normal(size=shape), sigma=SMOOTH)
    field /= field.std()
    image = offset + scale * field + NOISE * scale * rng.normal(size=shape)
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
    # One case at 0.8x the training spacing in-plane (1.25x the voxels): both
    # pipelines resample it to the training grid and back.
    fine = tuple(v if v > 1.0 else 0.8 * v for v in spacing)
    fine_shape = tuple(round(n * v / f) for n, v, f in zip(shape, spacing, fine, strict=True))
    resampled = root / f"test_{key}_resampled"
    resampled.mkdir()
    image, _ = _case(rng, fine_shape, offset, scale)
    _save(image, fine, resampled / f"{key}fine_000_0000.nii.gz")
    files.append(str(resampled / f"{key}fine_000_0000.nii.gz"))
    # One case that needs cropping AND resampling: another fine-spacing case in
    # a frame of zeros (one zero slice along the thick axis): nnU-Net crops it
    # to the nonzero box before normalising and resampling.
    cropped = root / f"test_{key}_cropped"
    cropped.mkdir()
    image, _ = _case(rng, fine_shape, offset, scale)
    thick, frames = int(np.argmax(spacing)), [(3, 6), (5, 2)]
    pad = [(1, 0) if a == thick else frames.pop(0) for a in range(3)]
    _save(np.pad(image, pad), fine, cropped / f"{key}crop_000_0000.nii.gz")
    files.append(str(cropped / f"{key}crop_000_0000.nii.gz"))
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
    transposed = [shape[a] for a in tf]
    for conf_name, patch in (("2d", transposed[1:]), ("3d_fullres", transposed)):
        conf = plans["configurations"][conf_name]
        conf["patch_size"] = patch
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


def _training_input(root: Path, name: str, plans: dict, configuration: str) -> np.ndarray:
    """The first training image as nnU-Net's network sees it: 2d ``[slices, 1, a, b]``,
    3d ``[1, 1, a, b, c]``."""
    first = sorted((root / "raw" / name / "imagesTr").iterdir())[0]
    arr = np.asarray(nib.load(str(first)).dataobj, dtype=np.float32).transpose(2, 1, 0)
    arr = arr.transpose(plans["transpose_forward"])
    scheme = plans["configurations"][configuration]["normalization_schemes"][0]
    if scheme == "CTNormalization":
        props = plans["foreground_intensity_properties_per_channel"]["0"]
        arr = np.clip(arr, props["percentile_00_5"], props["percentile_99_5"])
        arr = (arr - props["mean"]) / props["std"]
    else:
        arr = (arr - arr.mean()) / arr.std()
    batch = arr[:, np.newaxis] if configuration == "2d" else arr[np.newaxis, np.newaxis]
    return batch.astype(np.float32)


def _balance(network, batch: np.ndarray) -> None:
    """Scale and shift the last layer: on the training image, the logit difference
    has median 0 (about half the voxels foreground) and standard deviation 6
    (probabilities far from 0.5, logits far from float16's range)."""
    import torch

    network.eval()
    out = network(torch.from_numpy(batch))
    out = out[0] if isinstance(out, list | tuple) else out
    diff = out[:, 1] - out[:, 0]
    factor = 6.0 / float(diff.std())
    shift = float(torch.median(diff)) * factor
    last = network.decoder.seg_layers[-1]
    last.weight.mul_(factor)
    last.bias.mul_(factor)
    last.bias[0] += shift / 2
    last.bias[1] -= shift / 2


def write_checkpoints(
    root: Path, name: str, plans: dict, configuration: str, folds: tuple[int, ...]
) -> Path:
    """Fold checkpoints of randomised, untrained networks; returns the model folder."""
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
            for mod in trainer.network.modules():
                convs = nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d
                if isinstance(mod, convs):
                    # Spatially constant kernels (random channel mixing): low-pass
                    # layers, so that the label maps are smooth like a trained
                    # model's instead of a random network's salt and pepper.
                    spatial = tuple(range(2, mod.weight.ndim))
                    mod.weight.copy_(
                        mod.weight.mean(dim=spatial, keepdim=True).expand_as(mod.weight)
                    )
                if isinstance(mod, convs) and mod.bias is not None:
                    mod.bias.normal_(0.0, 0.2)
                if isinstance(mod, nn.InstanceNorm2d | nn.InstanceNorm3d) and mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0.0, 0.3)
            # Opposite logits for the two classes (no common mode, which would
            # only inflate nnU-Net's float16 rounding), then scaled and balanced.
            last = trainer.network.decoder.seg_layers[-1]
            last.weight[1] = -last.weight[0]
            last.bias.zero_()
            _balance(trainer.network, _training_input(root, name, plans, configuration))
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
        models = {c: str(write_checkpoints(root, name, plans, c, (0, 1))) for c in CONFIGURATIONS}
        runs = {}
        for run, (configuration, folds, mirror, suffix) in RUNS.items():
            out = root / f"pred_{key}_{run}"
            test_dir = root / f"test_{key}{suffix}"
            predict(Path(models[configuration]), test_dir, out, folds, mirror)
            runs[run] = {
                "tests": [t for t in tests if Path(t).parent == test_dir],
                "model_dir": models[configuration],
                "folds": list(folds),
                "mirror": mirror,
                "out": str(out),
            }
        summary[key] = {
            "model_dir": models["2d"],
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
