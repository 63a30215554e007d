"""SWAG and SWAG-D: statistics against a direct computation, seeded draws, an end-to-end bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from uqserve.models import noise  # noqa: E402
from uqserve.models.swag import (  # noqa: E402
    SwagCollector,
    SwagStats,
    draw_weights,
    snapshot_steps,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _snapshots(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"weight": rng.normal(size=(2, 3)), "bias": rng.normal(size=2) + 5.0} for _ in range(n)]


def _collect(snaps: list[dict[str, np.ndarray]], k: int, diag: bool) -> SwagStats:
    net = torch.nn.Linear(3, 2)
    col = SwagCollector(net, k, diag_only=diag)
    for s in snaps:
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(torch.from_numpy(s[name]))
        col.collect(net)
    return col.stats()


def test_statistics_equal_a_direct_computation() -> None:
    snaps = _snapshots(7)
    stats = _collect(snaps, k=4, diag=False)
    assert stats.collected == 7 and stats.snapshots == 4
    for name in ("weight", "bias"):
        w = np.stack([s[name].astype(np.float32).astype(np.float64) for s in snaps])
        np.testing.assert_allclose(stats.mean[name].numpy(), w.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.sq_mean[name].numpy(), (w**2).mean(0), rtol=1e-12)
        # Row i: snapshot i minus the running mean after snapshot i; the last 4 rows kept.
        running = np.cumsum(w, axis=0) / np.arange(1, 8).reshape(-1, *[1] * (w.ndim - 1))
        dev = (w - running).reshape(7, -1)[-4:]
        np.testing.assert_allclose(stats.dev[name].numpy(), dev, rtol=1e-6, atol=1e-6)
    assert _collect(snaps, k=4, diag=True).dev == {}


def test_snapshot_steps_cover_the_last_k_times_n_steps() -> None:
    assert snapshot_steps(100, 3, 10) == [79, 89, 99]
    assert snapshot_steps(6, 3, 2) == [1, 3, 5]


def test_draws_are_seeded_and_follow_the_swag_covariance() -> None:
    stats = _collect(_snapshots(6, seed=1), k=5, diag=False)
    a, b = draw_weights(stats, 3, seed=11), draw_weights(stats, 3, seed=11)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["weight"], draw_weights(stats, 4, seed=11)["weight"])
    assert not torch.equal(a["weight"], draw_weights(stats, 3, seed=12)["weight"])
    # The empirical covariance of many draws approaches diag(var) + D^T D / (K - 1).
    names = sorted(stats.mean)
    mean = np.concatenate([stats.mean[k].numpy().ravel() for k in names])
    var = np.concatenate([(stats.sq_mean[k] - stats.mean[k] ** 2).numpy().ravel() for k in names])
    dev = np.concatenate([stats.dev[k].numpy() for k in names], axis=1).astype(np.float64)
    expected = np.diag(np.maximum(var, 1e-30)) + dev.T @ dev / 4
    n = 4000
    draws = np.stack(
        [
            np.concatenate([draw_weights(stats, d, 0)[k].numpy().ravel() for k in names])
            for d in range(n)
        ]
    )
    assert (np.abs(draws.mean(0) - mean) < 4 * np.sqrt(expected.diagonal() / n)).all()
    cov = np.cov(draws.T)
    scale = np.sqrt(np.outer(expected.diagonal(), expected.diagonal()))
    assert np.abs(cov - expected).max() / scale.max() < 0.1
    # Off-diagonal structure is there (the low-rank term couples weight and bias).
    assert np.abs(expected - np.diag(expected.diagonal())).max() > 0.1 * scale.max()


def test_swag_diagonal_draws_have_diagonal_covariance() -> None:
    stats = _collect(_snapshots(6, seed=2), k=5, diag=True)
    names = sorted(stats.mean)
    var = np.concatenate([(stats.sq_mean[k] - stats.mean[k] ** 2).numpy().ravel() for k in names])
    draws = np.stack(
        [
            np.concatenate([draw_weights(stats, d, 5)[k].numpy().ravel() for k in names])
            for d in range(3000)
        ]
    )
    cov = np.cov(draws.T)
    np.testing.assert_allclose(cov.diagonal(), var, rtol=0.12)
    off = cov - np.diag(cov.diagonal())
    assert np.abs(off).max() < 0.12 * var.max()


def test_draw_noise_is_the_counter_based_noise() -> None:
    # z_r of draw d is the hash noise of (seed, d, stream, k): the same in any process.
    stats = _collect(_snapshots(3), k=3, diag=False)
    z = noise.normal_np([7, 0, 97, np.arange(3)])
    assert z.shape == (3,) and np.isfinite(draw_weights(stats, 0, 7)["bias"].numpy()).all()


def test_stats_file_round_trip(tmp_path: Path) -> None:
    stats = _collect(_snapshots(5), k=3, diag=False)
    stats.save(tmp_path / "s.safetensors")
    back = SwagStats.load(tmp_path / "s.safetensors")
    assert (back.snapshots, back.collected, back.diag_only) == (3, 5, False)
    for k in stats.mean:
        assert torch.equal(back.mean[k], stats.mean[k]) and torch.equal(back.dev[k], stats.dev[k])
    a, b = draw_weights(stats, 2, 9), draw_weights(back, 2, 9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "bad").write_text("nope")
    with pytest.raises(ValueError, match="not a SWAG statistics file"):
        SwagStats.load(tmp_path / "bad")


TRAIN = {
    "steps": 6,
    "batch_size": 2,
    "size": (32, 32),
    "num_images": 4,
    "image_size": 32,
    "validate": 0,
    "warmup_steps": 1,
    "threads": 1,
    "swag_snapshots": 3,
    "swag_every": 2,
    "swag_draws": 3,
}


@pytest.mark.parametrize("eu", ["swag", "swagdiag"])
def test_swag_bundle_runs_end_to_end_through_predict(tmp_path: Path, eu: str) -> None:
    from safetensors.torch import load_file

    from uqserve.bundle import sha256_file
    from uqserve.exporting import export_checkpoints
    from uqserve.models import ModelConfig
    from uqserve.prediction import predict_volume
    from uqserve.training import TrainConfig, TrainError, train
    from uqserve.volumes import Volume

    mc = ModelConfig(width=4, depth=3, num_samples=2)
    ckpt = train(
        f"ssn-{eu}",
        tmp_path / "ckpt",
        config=TrainConfig(**TRAIN),  # type: ignore[arg-type]
        model_config=mc,
    )
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["bundle_members"] == 3 and cfg["swag"]["diag_only"] == (eu == "swagdiag")
    stats = SwagStats.load(ckpt / "swag.safetensors")
    assert stats.collected == 3 and (stats.dev == {}) == (eu == "swagdiag")
    member = load_file(str(ckpt / "member_0.safetensors"))  # the SWA mean
    for k, v in stats.mean.items():
        assert torch.allclose(member[k], v.to(torch.float32))

    b = export_checkpoints(ckpt, tmp_path / "b")
    assert (b.manifest.eu, b.manifest.num_members) == (eu, 3)
    assert b.manifest.extra["swag"]["draw_seed"] == 0
    again = export_checkpoints(ckpt, tmp_path / "b2")
    digests = [sha256_file(b.member_path(m)) for m in range(3)]
    assert digests == [sha256_file(again.member_path(m)) for m in range(3)]  # frozen draws
    assert len(set(digests)) == 3

    from uqserve.data import make_dataset

    img = make_dataset(1, seed=3, size=32).images[0][0]  # [32, 32] raw intensities
    vol = Volume(data=img[:, :, None].astype(np.float32), affine=np.eye(4), source="t")
    pred = predict_volume(vol, b.path)
    assert pred.eu.shape == (32, 32, 1) and float(pred.eu.max()) > 0.0
    assert pred.report["bundle"]["eu"] == eu
    with pytest.raises(TrainError, match="steps must be >= 6"):
        train(
            f"ssn-{eu}",
            tmp_path / "c",
            config=TrainConfig(**{**TRAIN, "steps": 5}),  # type: ignore[arg-type]
            model_config=mc,
        )


@pytest.mark.parametrize("au", ["softmax", "ssn", "punet", "diffusion"])
@pytest.mark.parametrize("eu", ["swag", "swagdiag"])
def test_swag_recipes_collect_their_snapshots_within_training(au: str, eu: str) -> None:
    from uqserve.exporting import load_recipe
    from uqserve.training import TrainConfig

    r = load_recipe(Path(__file__).resolve().parents[1] / "export" / f"{au}-{eu}.toml")
    tc = TrainConfig(**r.train)
    assert tc.swag_snapshots * tc.swag_every <= tc.steps and r.num_members == 10
