"""nnU-Net model folders and `uqserve train` checkpoints are untrusted: no code runs on export.

The model folders here are built with nnU-Net's own network builder and hold
checkpoints with exactly the keys ``nnUNetTrainer.save_checkpoint`` writes,
including the numpy scalars of a trained run's log; hostile variants add
pickled callables, break a file or make the labels disagree with the weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("nnunetv2")
torch = pytest.importorskip("torch")

from uqserve.cli import app  # noqa: E402
from uqserve.exporting import ExportError, export_nnunet  # noqa: E402

runner = CliRunner()

_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3], [3, 3]], "strides": [[1, 1], [2, 2]],
        "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}  # fmt: skip
PLANS: dict[str, Any] = {
    "dataset_name": "Dataset977_hostile", "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [3.0, 1.0, 1.0],
    "original_median_shape_after_transp": [5, 32, 32], "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {"2d": {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [32, 32], "median_image_size_in_voxels": [32.0, 32.0],
        "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                      "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                     "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": _ARCH, "batch_dice": True,
    }},
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {"0": {
        "max": 600.0, "mean": 370.0, "median": 360.0, "min": 320.0,
        "percentile_00_5": 323.0, "percentile_99_5": 537.0, "std": 44.0,
    }},
}  # fmt: skip
DATASET = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "lesion": 1},
           "numTraining": 4, "file_ending": ".nii.gz"}  # fmt: skip


def _checkpoint(seed: int, *, num_out: int = 2) -> dict[str, Any]:
    """What nnUNetTrainer.save_checkpoint writes after some epochs (numpy scalars in the log)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(PLANS))
    torch.manual_seed(seed)
    net = nnUNetTrainer.build_network_architecture(
        pm, pm.get_configuration("2d"), 1, num_out, enable_deep_supervision=False
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    dice = [np.float64(0.71 + seed / 100)]
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.nanmean(dice)],
            "ema_fg_dice": [np.float64(0.7)],
            "dice_per_class_or_region": [dice],
            "train_losses": [np.float32(-0.4)],
            "val_losses": [np.float32(-0.5)],
            "lrs": [0.01],
            "epoch_start_timestamps": [1.0],
            "epoch_end_timestamps": [2.0],
        },
        "_best_ema": np.float64(0.7),
        "current_epoch": 1,
        "init_args": {
            "plans": PLANS,
            "configuration": "2d",
            "fold": seed,
            "dataset_json": DATASET,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1),
    }


def _model_folder(root: Path, folds: tuple[int, ...] = (0,)) -> Path:
    folder = root / "Dataset977_hostile" / "nnUNetTrainer__nnUNetPlans__2d"
    for f in folds:
        (folder / f"fold_{f}").mkdir(parents=True)
        torch.save(_checkpoint(f), folder / f"fold_{f}" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(PLANS))
    (folder / "dataset.json").write_text(json.dumps(DATASET))
    return folder


def _cli_fails_in_one_line(folder: Path, out: Path, *extra: str) -> str:
    result = runner.invoke(app, ["export", "--nnunet", str(folder), "-o", str(out), *extra])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert "bug in uqserve" not in err, err
    assert not out.exists()
    return err


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-looking one-fold folder exports: the allow-list admits nnU-Net's own types."""
    root = tmp_path_factory.mktemp("nn")
    bundle = export_nnunet(_model_folder(root), root / "bundle")
    return bundle.path


def test_a_real_checkpoint_with_numpy_log_values_exports(exported: Path) -> None:
    man = json.loads((exported / "manifest.json").read_text())
    assert man["classes"] == ["background", "lesion"] and man["num_members"] == 1


class _Mkdir:
    """Unpickling this calls os.mkdir(path): code run by loading a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


class _Open:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    ("where", "payload", "type_name"),
    [("logging", _Mkdir, "posix.mkdir"), ("optimizer_state", _Open, "io.open")],
)
def test_a_pickled_payload_in_a_checkpoint_never_runs(
    tmp_path: Path, where: str, payload: type, type_name: str
) -> None:
    folder = _model_folder(tmp_path)
    marker = tmp_path / "pwned"
    ckpt = _checkpoint(0)
    ckpt[where]["extra"] = payload(marker)
    path = folder / "fold_0" / "checkpoint_final.pth"
    torch.save(ckpt, path)
    err = _cli_fails_in_one_line(folder, tmp_path / "b")
    assert str(path) in err and type_name in err and "refused" in err, err
    assert not marker.exists()  # nothing ran


def test_a_payload_in_a_checkpoint_of_another_configuration_never_runs(tmp_path: Path) -> None:
    """The folder name says no configuration: the checkpoint is read to find it, safely too."""
    folder = _model_folder(tmp_path)
    renamed = folder.rename(folder.with_name("mymodel"))
    marker = tmp_path / "pwned"
    ckpt = _checkpoint(0)
    ckpt["init_args"]["evil"] = _Mkdir(marker)
    torch.save(ckpt, renamed / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ExportError, match=r"checkpoint_final\.pth: holds the type posix\.mkdir"):
        export_nnunet(renamed, tmp_path / "b")
    assert not marker.exists()


# --------------------------------------------------------------------------- 5: repeated folds


def test_repeated_folds_are_refused_by_their_weights(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path, folds=(0, 1))
    err = _cli_fails_in_one_line(folder, tmp_path / "b", "--folds", "1,0,1")
    assert "fold_1/checkpoint_final.pth has the same weights as" in err and "EU = 0" in err
    # A fold folder that is a copy of another is refused just the same.
    (folder / "fold_2").mkdir()
    (folder / "fold_2" / "checkpoint_final.pth").write_bytes(
        (folder / "fold_0" / "checkpoint_final.pth").read_bytes()
    )
    err = _cli_fails_in_one_line(folder, tmp_path / "b")
    assert "fold_2/checkpoint_final.pth has the same weights as" in err, err


# --------------------------------------------------------------------------- 10: broken folders


def _break(folder: Path, how: str) -> Path:
    """Break one file of ``folder``; returns the file the error must name."""
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    if how == "no labels":
        (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}}))
        return folder / "dataset.json"
    if how == "dataset not json":
        (folder / "dataset.json").write_text('{"labels": {"background": 0,')
        return folder / "dataset.json"
    if how == "plans not json":
        (folder / "plans.json").write_text("configurations: 2d\n")
        return folder / "plans.json"
    if how == "checkpoint is text":
        ckpt.write_text("this is not a checkpoint\n")
        return ckpt
    if how == "truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 3])
        return ckpt
    if how == "not a dict":
        torch.save([torch.zeros(2)], ckpt)
        return ckpt
    assert how == "labels differ"
    labels = {"background": 0, "liver": 1, "tumour": 2}
    (folder / "dataset.json").write_text(json.dumps({**DATASET, "labels": labels}))
    return ckpt


@pytest.mark.parametrize(
    "how",
    ["no labels", "dataset not json", "plans not json", "checkpoint is text", "truncated",
     "not a dict", "labels differ"],
)  # fmt: skip
def test_a_broken_nnunet_folder_is_one_line_naming_the_file(tmp_path: Path, how: str) -> None:
    folder = _model_folder(tmp_path)
    named = _break(folder, how)
    err = _cli_fails_in_one_line(folder, tmp_path / "b")
    assert str(named) in err, err
    assert "Errno" not in err, err


# --------------------------------------------------------------------------- uqserve train folders


def test_train_checkpoints_are_read_without_pickle_and_inside_their_folder(tmp_path: Path) -> None:
    from uqserve.checkpoints import CheckpointError, load_checkpoints

    ck = tmp_path / "ck"
    ck.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"w": _Mkdir(marker)}, ck / "member_0.safetensors")  # a pickle in disguise
    config = {
        "format": "uqserve-checkpoints", "version": 1, "combination": "softmax-none",
        "model_config": {"num_classes": 2, "width": 4, "depth": 1},
        "members": [{"file": "member_0.safetensors"}],
    }  # fmt: skip
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"member_0\.safetensors: not a readable safetensors"):
        load_checkpoints(ck)
    assert not marker.exists()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"")
    for file in ("../elsewhere.safetensors", str(outside)):
        (ck / "config.json").write_text(json.dumps({**config, "members": [{"file": file}]}))
        with pytest.raises(CheckpointError, match=r"config\.json: member file .* leads outside"):
            load_checkpoints(ck)
