"""assemble_checkpoints: rows built from shared ``none`` networks equal what ``train`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from uqserve.data import make_dataset  # noqa: E402
from uqserve.models import ModelConfig  # noqa: E402
from uqserve.models.swag import SwagStats  # noqa: E402
from uqserve.training import TrainConfig, TrainError, assemble_checkpoints, train  # noqa: E402

TINY = ModelConfig(width=4, depth=2, num_samples=2)
CFG = TrainConfig(steps=8, batch_size=2, size=(16, 16), warmup_steps=2, num_members=2,
                  swag_snapshots=3, swag_every=2, swag_draws=2, validate=3, image_size=16,
                  num_images=6, threads=1)  # fmt: skip


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(path)).items()}


def _same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two shared ``softmax-none`` networks, seeds 5 and 6; the first collects SWAG."""
    root = tmp_path_factory.mktemp("shared")
    a = train("softmax-none", root / "net0", config=CFG, model_config=TINY, seed=5,
              collect_swag=True)  # fmt: skip
    b = train("softmax-none", root / "net1", config=CFG, model_config=TINY, seed=6)
    return a, b


def test_collecting_swag_changes_nothing_in_the_none_network(
    tmp_path: Path, nets: tuple[Path, Path]
) -> None:
    plain = train("softmax-none", tmp_path / "plain", config=CFG, model_config=TINY, seed=5)
    _same(nets[0] / "member_0.safetensors", plain / "member_0.safetensors")
    assert (nets[0] / "swag.safetensors").is_file() and not (plain / "swag.safetensors").exists()


def test_assembled_ensemble_is_the_trained_ensemble(
    tmp_path: Path, nets: tuple[Path, Path]
) -> None:
    ens = assemble_checkpoints(list(nets), "softmax-ensemble", tmp_path / "ens")
    ref = train("softmax-ensemble", tmp_path / "ref", config=CFG, model_config=TINY, seed=5)
    for m in range(2):
        _same(ens / f"member_{m}.safetensors", ref / f"member_{m}.safetensors")
    got, want = (json.loads((p / "config.json").read_text()) for p in (ens, ref))
    for key in ("combination", "eu", "num_members", "bundle_members", "seed", "validation"):
        assert got[key] == want[key], key
    assert "swag" not in got


@pytest.mark.parametrize("eu", ["swag", "swagdiag"])
def test_assembled_swag_is_the_trained_swag(
    tmp_path: Path, nets: tuple[Path, Path], eu: str
) -> None:
    got_dir = assemble_checkpoints([nets[0]], f"softmax-{eu}", tmp_path / "got")
    ref = train(f"softmax-{eu}", tmp_path / "ref", config=CFG, model_config=TINY, seed=5)
    _same(got_dir / "member_0.safetensors", ref / "member_0.safetensors")
    a, b = SwagStats.load(got_dir / "swag.safetensors"), SwagStats.load(ref / "swag.safetensors")
    assert (a.diag_only, a.collected, sorted(a.dev)) == (b.diag_only, b.collected, sorted(b.dev))
    for k in a.mean:
        torch.testing.assert_close(a.sq_mean[k], b.sq_mean[k], rtol=0, atol=0)
    got, want = (json.loads((p / "config.json").read_text()) for p in (got_dir, ref))
    for key in ("combination", "eu", "bundle_members", "swag", "validation"):
        assert got[key] == want[key], key


def test_mcdropout_and_wrong_sources_are_refused(tmp_path: Path, nets: tuple[Path, Path]) -> None:
    with pytest.raises(TrainError, match="MC dropout"):
        assemble_checkpoints([nets[0]], "softmax-mcdropout", tmp_path / "a")
    with pytest.raises(TrainError, match="ssn-none"):
        assemble_checkpoints([nets[0]], "ssn-none", tmp_path / "b")
    with pytest.raises(TrainError, match="collect_swag"):
        assemble_checkpoints([nets[1]], "softmax-swag", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_the_paper_schedule_for_ssn_warmup(tmp_path: Path) -> None:
    data = make_dataset(4, seed=0, size=16)
    cfg = TrainConfig(**{**CFG.to_dict(), "steps": 64, "validate": 0})
    out = train("ssn-none", tmp_path / "s", config=cfg, model_config=TINY, data=data)
    assert json.loads((out / "config.json").read_text())["model_config"]["ssn_warmup"] == 2
