"""Training real combinations from the model registry (tiny sizes), checkpoints, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from uqserve.cli import app  # noqa: E402
from uqserve.data import make_dataset, normalization_stats, write_example_folder  # noqa: E402
from uqserve.models import ModelConfig  # noqa: E402
from uqserve.training import (  # noqa: E402
    TrainConfig,
    TrainError,
    load_checkpoints,
    majority_vote,
    train,
)

TINY = ModelConfig(width=4, depth=3, num_samples=3)


@pytest.fixture(scope="module")
def easy() -> object:
    """Four 32x32 slices with low ambiguity: an easy, fixed training set."""
    return make_dataset(4, seed=0, size=32, ambiguity="low")


def _quick(steps: int = 30, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "steps": steps,
        "batch_size": 4,
        "size": (32, 32),
        "lr": 1e-2,
        "warmup_steps": 2,
        "augment": False,
        "validate": 0,
        "threads": 1,
    }
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(path)).items()}


@pytest.mark.parametrize(
    ("combination", "files", "bundle_members"),
    [("softmax-ensemble", 2, 2), ("ssn-none", 1, 1), ("punet-mcdropout", 1, 7)],
)
def test_train_real_combination(
    tmp_path: Path, easy: object, combination: str, files: int, bundle_members: int
) -> None:
    config = _quick(num_members=2, num_masks=7)
    out = train(combination, tmp_path / "ck", config=config, model_config=TINY, data=easy)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["combination"] == combination
    assert cfg["num_members"] == files and cfg["bundle_members"] == bundle_members
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] + [
        f"member_{m}.safetensors" for m in range(files)
    ]
    assert not list(tmp_path.glob(".ck.tmp-*")), "temp folder renamed away"
    # Loss goes down on the easy set (first vs last 5 of 30 steps).
    for member in cfg["members"]:
        curve = member["loss_curve"]
        assert len(curve) == 30
        assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:5]), curve
    # The normalisation is the training images' mean and std.
    mean, std = normalization_stats(easy.images)  # type: ignore[attr-defined]
    norm = cfg["normalization"]
    assert (norm["scheme"], norm["clip"]) == ("fixed", None)
    assert (norm["mean"], norm["std"]) == pytest.approx((mean, std), rel=1e-9)
    assert cfg["model_config"]["dropout"] == (0.2 if combination.endswith("mcdropout") else 0.0)
    # An SSN without a set warm-up warms up for the paper's 10/320 of the steps (>= 1).
    assert cfg["model_config"]["ssn_warmup"] == (1 if combination.startswith("ssn") else 0)
    # Checkpoints reload into networks that run.
    ck = load_checkpoints(out)
    assert len(ck.networks) == files
    x = torch.from_numpy(((easy.images[:2] - mean) / std).astype(np.float32))  # type: ignore[attr-defined]
    with torch.no_grad():
        probs = ck.networks[0](x)
    assert probs.shape[0] == 2 and probs.shape[2:] == (2, 32, 32)
    torch.testing.assert_close(probs.sum(dim=2), torch.ones_like(probs.sum(dim=2)))


def test_same_seed_same_weights_and_members_are_seeded_seed_plus_m(
    tmp_path: Path, easy: object
) -> None:
    cfg = _quick(steps=6, augment=True, num_members=2)
    a = train(
        "softmax-ensemble",
        tmp_path / "a",
        config=cfg,
        model_config=TINY,
        data=easy,
        seed=3,
    )
    b = train(
        "softmax-ensemble",
        tmp_path / "b",
        config=cfg,
        model_config=TINY,
        data=easy,
        seed=3,
    )
    c = train(
        "softmax-none",
        tmp_path / "c",
        config=cfg,
        model_config=TINY,
        data=easy,
        seed=4,
    )
    wa0, wa1 = _weights(a / "member_0.safetensors"), _weights(a / "member_1.safetensors")
    wb0 = _weights(b / "member_0.safetensors")
    wc0 = _weights(c / "member_0.safetensors")
    for k in wa0:
        np.testing.assert_array_equal(wa0[k], wb0[k])
        np.testing.assert_array_equal(wa1[k], wc0[k])  # member 1 of seed 3 == seed 4
    assert any(not np.array_equal(wa0[k], wa1[k]) for k in wa0), "members differ"


def test_train_from_folder(tmp_path: Path) -> None:
    root = write_example_folder(
        tmp_path / "cases", num_cases=2, shape=(40, 40, 3), num_annotators=2
    )
    out = train(
        "softmax-none",
        tmp_path / "ck",
        config=_quick(steps=3),
        model_config=TINY,
        data=root,
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == {"source": "folder", "path": str(root), "cases": 2, "slices": 6}
    assert cfg["spacing"] == pytest.approx([0.8, 0.8])
    assert cfg["validation"] == {}


def test_bad_input_fails_with_one_clear_line(tmp_path: Path, easy: object) -> None:
    with pytest.raises(
        TrainError, match=r"unknown combination 'softmax-laplace'.*softmax-ensemble"
    ):
        train("softmax-laplace", tmp_path / "x", config=_quick(), model_config=TINY, data=easy)
    with pytest.raises(TrainError, match=r"nowhere: not a folder"):
        train(
            "softmax-none",
            tmp_path / "x",
            config=_quick(),
            model_config=TINY,
            data=tmp_path / "nowhere",
        )
    bad = write_example_folder(tmp_path / "bad", num_cases=1, shape=(16, 16, 2), num_annotators=1)
    (bad / "case_000" / "label_r0.nii.gz").unlink()
    with pytest.raises(TrainError, match=r"case_000: no label_<annotator>"):
        train("softmax-none", tmp_path / "x", config=_quick(), model_config=TINY, data=bad)
    with pytest.raises(TrainError, match="multiple of 4"):
        train(
            "softmax-none",
            tmp_path / "x",
            config=_quick(size=(30, 30)),
            model_config=TINY,
            data=easy,
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(TrainError, match="not empty; pass `overwrite=True`"):
        train("softmax-none", tmp_path / "full", config=_quick(), model_config=TINY, data=easy)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_diverging_training_leaves_nothing(tmp_path: Path, easy: object) -> None:
    with pytest.raises(TrainError, match="loss became"):
        train(
            "softmax-none",
            tmp_path / "ck",
            config=_quick(steps=20, lr=1e35, warmup_steps=1, grad_clip=1e30),
            model_config=TINY,
            data=easy,
        )
    assert list(tmp_path.iterdir()) == []


def test_majority_vote_ties_go_to_lower_class() -> None:
    ann = np.array([[0, 1, 1, 2], [0, 1, 0, 2], [1, 0, 1, 1], [1, 2, 2, 1]])[:, None, :]
    np.testing.assert_array_equal(majority_vote(ann, 3)[0], [0, 1, 1, 1])


def test_import_does_not_pull_torch() -> None:
    code = "import sys, uqserve.data, uqserve.training; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- CLI --------------------------------------------------------------------------


def test_cli_train_and_refuse_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ck"
    args = ["train", "softmax-ensemble", "--out", str(out), "--members", "2", "--steps", "2"]
    args += ["--size", "32", "--width", "4", "--batch-size", "2", "--quiet", "--threads", "1"]
    args += ["--images", "8"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "Dice vs annotator majority" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_members"] == 2 and cfg["model_config"]["width"] == 4
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert "not empty; pass --overwrite" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["softmax-laplace"], "unknown combination"),
        (["ssn-none", "--members", "3"], "exactly one member"),
        (["softmax-none", "--data", "/nonexistent/folder"], "not a folder"),
        (["softmax-none", "--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_cli_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 1
    assert message in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_fails_with_one_clear_line(tmp_path: Path) -> None:
    args = ["train", "softmax-none", "--out", str(tmp_path / "o"), "--quiet", "--device", "cuda"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "no CUDA GPU" in res.output and "device='cpu'" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_default_softmax_member_reaches_dice(tmp_path: Path) -> None:
    """The shipped-bundle settings: one softmax member at the defaults (a few CPU minutes)."""
    out = train("softmax-none", tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    dice = cfg["validation"]["dice_vs_majority_mean"]
    print(json.dumps({"dice_vs_majority": dice, "seconds": cfg["members"][0]["seconds"]}))
    assert dice > 0.7


def test_checkpoints_export_to_a_bundle(tmp_path: Path, easy: object) -> None:
    """The exporter reads what train writes (config.json keys, file names, normalisation)."""
    exporting = pytest.importorskip("uqserve.exporting")
    from uqserve.bundle import load_bundle

    ck = train(
        "softmax-none",
        tmp_path / "ck",
        config=_quick(steps=2),
        model_config=TINY,
        data=easy,
    )
    exporting.export_checkpoints(ck, tmp_path / "bundle", calibrate=False)
    man = load_bundle(tmp_path / "bundle").manifest
    cfg = json.loads((ck / "config.json").read_text())
    assert man.combination == "softmax-none" and man.classes == ("background", "lesion")
    assert man.input.tile_size == (32, 32)
    assert man.input.normalization.mean == pytest.approx(cfg["normalization"]["mean"])
    assert man.input.normalization.std == pytest.approx(cfg["normalization"]["std"])


def test_cli_defaults_match_train_config() -> None:
    """`uqserve train` and TrainConfig() train the same thing by default."""
    import inspect

    from uqserve.cli.train import train_command
    from uqserve.training import DEFAULT_WIDTH

    params = inspect.signature(train_command).parameters
    d = TrainConfig()
    assert params["steps"].default == d.steps
    assert params["batch_size"].default == d.batch_size
    assert (params["size"].default,) * 2 == d.size
    assert params["lr"].default == d.lr
    assert params["images"].default == d.num_images
    assert params["width"].default == DEFAULT_WIDTH
