"""Export: all 20 combinations to real ONNX members run in onnxruntime, bundles, BYO ONNX, CLI."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from typer.testing import CliRunner  # noqa: E402

from uqserve.bundle import BUNDLES_DIR, InputSpec, load_bundle, sha256_file  # noqa: E402
from uqserve.calibration import VALIDATION_KEYS, calibrate_bundle  # noqa: E402
from uqserve.checkpoints import CheckpointError  # noqa: E402
from uqserve.cli import app  # noqa: E402
from uqserve.exporting import (  # noqa: E402
    ExportError,
    ExportPlan,
    export_checkpoints,
    export_networks,
    export_onnx_members,
    load_recipe,
    parity_feeds,
)
from uqserve.models import COMBINATIONS, ModelConfig, build_network, parse_combination  # noqa: E402
from uqserve.models.member import MEMBER_KEY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTS = ("mean", "sample_entropy", "sample_counts", "sample_labels")
runner = CliRunner()
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@functools.cache
def _data() -> tuple[np.ndarray, np.ndarray]:
    from uqserve.data import make_dataset

    ds = make_dataset(4, seed=1, size=(32, 32))
    return ds.images, ds.annotations


def _train(au: str, cfg: ModelConfig, n_nets: int, steps: int = 3) -> list[torch.nn.Module]:
    images, annotations = _data()
    image = torch.from_numpy(images)
    target = torch.from_numpy(annotations[:, 0].astype(np.int64))
    nets = []
    for i in range(n_nets):
        torch.manual_seed(i)
        net = build_network(au, cfg).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(steps):
            loss, _ = net.loss(image, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        nets.append(net.eval())
    return nets


def _plan(comb: str, m: int, s: int, **kw: object) -> ExportPlan:
    au, eu = parse_combination(comb)
    return ExportPlan(
        name=comb,
        au=au,
        eu=eu,
        num_members=m,
        num_samples=s,
        classes=("background", "lesion"),
        input=InputSpec(tile_size=(32, 32), multiple=4),
        seed=3,
        **kw,  # type: ignore[arg-type]
    )


def _session(path: Path) -> object:
    """onnxruntime directly: the peer the exported graphs are checked against."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@functools.cache
def _cached_session(path: Path, digest: str) -> object:
    return _session(path)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = _cached_session(path, sha256_file(path))
    return sess.run(list(OUTS), feeds)  # type: ignore[attr-defined]


#: Every AU and every EU method once; the other 15 combinations run with the slow tests.
#: Each is trained for 3 steps at 32 x 32: the tests check the plumbing, not the model.
FAST_COMBINATIONS = ("softmax-swagdiag", "ssn-ensemble", "punet-mcdropout", "diffusion-none",
                     "ssn-swag")  # fmt: skip
#: The one combination exported with the paper's 10 DDIM steps unrolled.
PAPER_DDIM_COMBINATION = "diffusion-ensemble"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A combination, trained a few steps at 32x32 and exported (parity checked inside), once."""
    root = tmp_path_factory.mktemp("bundles")

    @functools.cache
    def export(comb: str) -> Path:
        au, eu = parse_combination(comb)
        s = 1 if au == "softmax" else 5  # > the default chunk of 4: two sample chunks
        m = 1 if eu == "none" else 2
        # 2 DDIM steps unrolled (the plumbing); the paper's 10 once, in the slow tier (a
        # 10-step diffusion-mcdropout export alone took 96 s of the suite's 11 minutes).
        steps = 10 if comb == PAPER_DDIM_COMBINATION else 2
        cfg = ModelConfig(
            width=8,
            depth=3,
            num_samples=s,
            dropout=0.2 if eu == "mcdropout" else 0.0,
            diffusion_steps=steps,
        )
        nets = _train(au, cfg, m if eu in ("ensemble", "swag", "swagdiag") else 1)
        calibrate = calibrate_bundle if comb == "ssn-ensemble" else None
        return export_networks(nets, root / comb, _plan(comb, m, s), cfg, calibrate=calibrate).path

    return export


@pytest.mark.parametrize(
    "comb",
    [
        c if c in FAST_COMBINATIONS else pytest.param(c, marks=pytest.mark.slow)
        for c in COMBINATIONS
    ],
)
def test_every_combination_exports_to_the_member_contract(
    exported: Callable[[str], Path], comb: str
) -> None:
    bundle = load_bundle(exported(comb))
    man = bundle.manifest
    assert man.combination == comb and man.opset == 18
    for i in range(man.num_members):
        model = onnx.load(str(bundle.member_path(i)))
        onnx.checker.check_model(model)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
        assert [vi.name for vi in model.graph.input] == ["image", "seed", "offset", "valid"]
        assert [vi.name for vi in model.graph.output] == list(OUTS)
        sess = _session(bundle.member_path(i))
        assert [x.name for x in sess.get_inputs()] == ["image", "seed", "offset", "valid"]
    s, k = man.num_samples, man.num_classes
    feeds = parity_feeds(1, (32, 48), batch=4, seed=7)  # dynamic H, W: not the export size
    mean, ent, counts, labels = _run(bundle.member_path(0), feeds)
    assert mean.shape == (4, k, 32, 48) and mean.dtype == np.float32
    assert ent.shape == (4, 32, 48) and ent.dtype == np.float32
    assert counts.shape == (4, s, k) and counts.dtype == np.float32
    assert labels.shape == (4, s, 32, 48) and labels.dtype == np.uint8
    np.testing.assert_allclose(mean.sum(1), 1.0, atol=1e-5)
    assert (ent >= -1e-6).all() and (ent <= np.log(k) + 1e-5).all()
    area = feeds["valid"][:, 0] * feeds["valid"][:, 1]
    np.testing.assert_array_equal(counts.sum(-1), np.repeat(area[:, None], s, axis=1))
    # counts are the valid-region histogram of the labels
    r, c = feeds["valid"][-1]
    np.testing.assert_array_equal(
        counts[-1, 0], np.bincount(labels[-1, 0, :r, :c].ravel(), minlength=k)
    )
    # one batch of 4 == 4 batches of 1 (noise and results do not depend on batching)
    singles = [
        _run(bundle.member_path(0), {n: v[i : i + 1] for n, v in feeds.items()}) for i in range(4)
    ]
    for j in range(4):
        np.testing.assert_allclose(
            np.concatenate([o[j] for o in singles]),
            [mean, ent, counts, labels][j],
            rtol=0,
            atol=1e-6,
        )
    if s > 1:  # the seed input drives the samples
        other_seed = dict(feeds, seed=feeds["seed"] + 1)
        assert np.abs(_run(bundle.member_path(0), other_seed)[0] - mean).max() > 1e-6
    if man.num_members > 1:
        other = _run(bundle.member_path(1), feeds)[0]
        assert np.abs(other - mean).max() > 1e-4  # members differ
    again = _run(bundle.member_path(0), feeds)
    for a, b in zip(again, [mean, ent, counts, labels], strict=True):
        np.testing.assert_array_equal(a, b)  # deterministic


def test_calibration_fills_the_ood_section(exported: Callable[[str], Path]) -> None:
    man = load_bundle(exported("ssn-ensemble")).manifest
    assert man.ood.threshold is not None and man.ood.aggregator == man.default_aggregator
    scores = np.asarray(man.ood.validation_scores)
    assert len(scores) == man.validation["n_validation_scores"] == 24
    assert man.ood.threshold == pytest.approx(np.quantile(scores, 0.95), rel=1e-4)
    assert tuple(man.validation) == VALIDATION_KEYS
    aurocs = {
        k: v for k, v in man.validation["ood_auroc_eu_by_aggregator"].items() if v is not None
    }
    assert aurocs[man.default_aggregator] == max(aurocs.values()) == man.validation["ood_auroc_eu"]
    assert man.validation["data"]["shifts"] == ["noise", "blur", "contrast", "jpeg"]
    assert math.isfinite(man.entanglement["delta_mean"])


def test_per_pixel_noise_in_graph_is_tiling_invariant(tmp_path: Path) -> None:
    """A 64-row slab equals two 32-row tiles with offsets when only the noise varies in space."""
    cfg = ModelConfig(width=8, depth=3, num_samples=4)
    net = build_network("ssn", cfg)
    with torch.no_grad():  # a backbone with zero weights: features are constant over the tile
        for p in net.backbone.parameters():
            p.zero_()
        for p in net.backbone.out_norm.parameters():
            p.fill_(0.5)
    b = export_networks([net], tmp_path / "b", _plan("ssn-none", 1, 4), cfg)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, 1, 64, 32)).astype(np.float32)
    seed = np.array([11], dtype=np.int64)
    slab = _run(
        b.member_path(0),
        {
            "image": img,
            "seed": seed,
            "offset": np.array([[4, 0, 8]]),
            "valid": np.array([[64, 32]]),
        },
    )
    tiles = _run(
        b.member_path(0),
        {
            "image": np.concatenate([img[:, :, :32], img[:, :, 32:]]),
            "seed": np.repeat(seed, 2),
            "offset": np.array([[4, 0, 8], [4, 32, 8]]),
            "valid": np.array([[32, 32], [32, 32]]),
        },
    )
    joined = np.concatenate([tiles[3][0], tiles[3][1]], axis=1)
    assert len(np.unique(slab[3])) == 2  # the noise does flip labels
    np.testing.assert_array_equal(slab[3][0], joined)
    np.testing.assert_allclose(
        slab[0][0], np.concatenate([tiles[0][0], tiles[0][1]], axis=1), atol=1e-6
    )
    np.testing.assert_array_equal(slab[2][0], tiles[2].sum(0))


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    cfg = ModelConfig(width=8, depth=3)
    nets = _train("softmax", cfg, 2, steps=1)
    target = tmp_path / "b"
    export_networks(nets, target, _plan("softmax-ensemble", 2, 1), cfg)
    before = sha256_file(target / "manifest.json")
    assert (target / "manifest.json").stat().st_mode & 0o044  # readable by a server's user
    with pytest.raises(ExportError, match="already exists; pass `overwrite=True`"):
        export_networks(nets, target, _plan("softmax-ensemble", 2, 1), cfg)
    with pytest.raises(ExportError, match="needs 2 networks"):
        export_networks(nets[:1], target, _plan("softmax-ensemble", 2, 1), cfg, overwrite=True)
    assert sha256_file(target / "manifest.json") == before  # untouched by the failures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp folders left
    export_networks(nets[::-1], target, _plan("softmax-ensemble", 2, 1), cfg, overwrite=True)
    assert sha256_file(target / "manifest.json") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ---------------------------------------------------------------- checkpoints


def _write_checkpoints(
    folder: Path, comb: str, nets: list[torch.nn.Module], cfg: ModelConfig
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for m, net in enumerate(nets):
        save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()},
            str(folder / f"member_{m}.safetensors"),
        )
    (folder / "config.json").write_text(
        json.dumps(
            {
                "format": "uqserve-checkpoints",
                "version": 1,
                "combination": comb,
                "model_config": cfg.to_dict(),
                "train_config": {"size": [32, 32]},
                "normalization": {"scheme": "fixed", "mean": 0.25, "std": 2.0},
                "num_members": len(nets),
                "members": [{"file": f"member_{m}.safetensors"} for m in range(len(nets))],
                "seed": 4,
            }
        )
    )
    return folder


def test_export_checkpoints(tmp_path: Path) -> None:
    cfg = ModelConfig(width=8, depth=3, dropout=0.2, num_samples=2)
    ckpt = _write_checkpoints(
        tmp_path / "ckpt", "ssn-mcdropout", _train("ssn", cfg, 1, steps=1), cfg
    )
    b = export_checkpoints(
        ckpt,
        tmp_path / "b",
        num_members=3,
        num_samples=4,
        classes=["bg", "lesion"],
    )
    man = b.manifest
    assert (man.au, man.eu, man.num_members, man.num_samples) == ("ssn", "mcdropout", 3, 4)
    assert man.classes == ("bg", "lesion") and man.seed == 4 and man.input.tile_size == (32, 32)
    assert (man.input.normalization.mean, man.input.normalization.std) == (0.25, 2.0)
    assert _run(b.member_path(2), parity_feeds(1, (32, 32)))[2].shape == (2, 4, 2)
    # Fresh masks: one export; the members differ only in their MEMBER_KEY initializer
    # (each passed the parity check against its own PyTorch graph).
    import onnx

    def body(m: int) -> tuple[bytes, list[int]]:
        g = onnx.load(str(b.member_path(m))).graph
        keys = [int(onnx.numpy_helper.to_array(i)) for i in g.initializer if i.name == MEMBER_KEY]
        rest = [i for i in g.initializer if i.name != MEMBER_KEY]
        del g.initializer[:]
        g.initializer.extend(rest)
        return g.SerializeToString(), keys

    assert [body(m)[1] for m in range(3)] == [[0], [1], [2]]
    assert body(0)[0] == body(1)[0] == body(2)[0]
    seeds = parity_feeds(1, (32, 32))
    assert not np.array_equal(_run(b.member_path(0), seeds)[0], _run(b.member_path(1), seeds)[0])

    with pytest.raises(ExportError, match="2 classes but 3 class names"):
        export_checkpoints(ckpt, tmp_path / "c", classes=["a", "b", "c"])
    (ckpt / "member_0.safetensors").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=r"member_0\.safetensors: checkpoint missing"):
        export_checkpoints(ckpt, tmp_path / "c")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        export_checkpoints(tmp_path / "nowhere", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_export_checkpoints_rejects_weights_of_another_model(tmp_path: Path) -> None:
    cfg = ModelConfig(width=8, depth=3)
    ckpt = _write_checkpoints(
        tmp_path / "ckpt", "softmax-none", _train("softmax", cfg, 1, steps=1), cfg
    )
    conf = json.loads((ckpt / "config.json").read_text())
    conf["model_config"]["width"] = 12
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        export_checkpoints(ckpt, tmp_path / "b")
    assert not (tmp_path / "b").exists()


TINY_TRAIN = {"steps": 2, "num_images": 4, "image_size": 32, "size": [32, 32], "validate": 0}


def test_recipe_route_trains_with_uqserve_training_then_exports(tmp_path: Path) -> None:
    from uqserve.exporting import export_recipe

    b = export_recipe(
        ROOT / "export" / "softmax-ensemble.toml",
        tmp_path / "b",
        overrides=TINY_TRAIN,
        calibrate=calibrate_bundle,
    )
    man = b.manifest
    # Named by the recipe, not by the folder it was written to.
    assert (man.name, man.au, man.eu, man.num_members, man.num_samples) == (
        "softmax-ensemble",
        "softmax",
        "ensemble",
        5,
        1,
    )
    assert man.classes == ("background", "lesion") and man.input.tile_size == (64, 64)
    assert man.input.normalization.std != 1.0  # from the training data
    assert man.ood.threshold is not None and man.extra["source"] == "checkpoints"
    with pytest.raises(ExportError, match="already exists"):
        export_recipe(ROOT / "export" / "softmax-ensemble.toml", tmp_path / "b")
    bad = tmp_path / "bad.toml"
    bad.write_text('combination = "ssn-ensemble"\n[train]\nstepz = 3\n')
    with pytest.raises(ExportError, match="stepz"):
        export_recipe(bad, tmp_path / "c")
    bad.write_text('combination = "ssn-laplace"\n')
    with pytest.raises(ExportError, match="unknown combination"):
        load_recipe(bad)


def test_checkpoints_from_uqserve_train_export(tmp_path: Path) -> None:
    from uqserve.training import TrainConfig, train

    cfg = ModelConfig(width=8, depth=3, num_samples=3)
    ckpt = train(
        "punet-mcdropout",
        tmp_path / "ckpt",
        config=TrainConfig(**{**TINY_TRAIN, "num_masks": 3}),  # type: ignore[arg-type]
        model_config=cfg,
    )
    b = export_checkpoints(ckpt, tmp_path / "b")
    assert (b.manifest.num_members, b.manifest.num_samples) == (3, 3)
    outs = [_run(b.member_path(m), parity_feeds(1, (32, 32)))[0] for m in range(3)]
    assert np.abs(outs[0] - outs[1]).max() > 1e-4  # three different frozen dropout masks


# ---------------------------------------------------------------- your own ONNX


class _UserNet(torch.nn.Module):
    def __init__(self, k: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, k, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _user_onnx(path: Path, k: int = 2, seed: int = 0, probs: bool = False) -> Path:
    net = _UserNet(k, seed).eval()
    model = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)) if probs else net
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 32, 32),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}},
    )
    return path


def test_bring_your_own_onnx_members(tmp_path: Path) -> None:
    files = [_user_onnx(tmp_path / f"fold{i}.onnx", seed=i) for i in range(3)]
    b = export_onnx_members(
        files,
        tmp_path / "b",
        classes=["background", "lesion"],
        tile_size=(32, 32),
        multiple=8,
        calibrate=calibrate_bundle,
    )
    man = b.manifest
    assert (man.au, man.eu, man.num_members, man.num_samples, man.opset) == (
        "softmax",
        "ensemble",
        3,
        1,
        17,
    )
    assert man.ood.threshold is not None
    feeds = parity_feeds(1, (40, 24), batch=3)
    for i, f in enumerate(files):
        mean, ent, counts, labels = _run(b.member_path(i), feeds)
        user = _session(f).run(None, {"input": feeds["image"]})[0]
        expect = torch.softmax(torch.from_numpy(user), 1).numpy()
        np.testing.assert_allclose(mean, expect, atol=1e-6)
        np.testing.assert_allclose(ent, -(expect * np.log(expect)).sum(1), atol=1e-5)
        np.testing.assert_array_equal(labels[:, 0], expect.argmax(1))
        for j, (r, c) in enumerate(feeds["valid"]):
            np.testing.assert_array_equal(
                counts[j, 0], np.bincount(expect[j].argmax(0)[:r, :c].ravel(), minlength=2)
            )
    # probabilities pass through unchanged
    pb = export_onnx_members(
        [_user_onnx(tmp_path / "p.onnx", probs=True)],
        tmp_path / "p",
        outputs="probs",
    )
    assert pb.manifest.eu == "none"
    user = _session(tmp_path / "p.onnx").run(None, {"input": feeds["image"]})[0]
    np.testing.assert_allclose(_run(pb.member_path(0), feeds)[0], user, atol=1e-7)


def test_bring_your_own_onnx_refusals(tmp_path: Path) -> None:
    good = _user_onnx(tmp_path / "good.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ExportError, match=r"notes\.onnx: not a valid ONNX model"):
        export_onnx_members([good, text], tmp_path / "b")
    with pytest.raises(ExportError, match="outputs 2 classes but 3 class names"):
        export_onnx_members([good], tmp_path / "b", classes=["a", "b", "c"])
    from onnx import TensorProto, helper

    flat = helper.make_model(
        helper.make_graph(
            [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)],
            "flat",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    onnx.save(flat, str(tmp_path / "flat.onnx"))
    with pytest.raises(ExportError, match=r"flat\.onnx: output 'y' must be float32 \[B, K, H, W\]"):
        export_onnx_members([tmp_path / "flat.onnx"], tmp_path / "b")
    with pytest.raises(ExportError, match="only softmax members"):
        export_onnx_members([good], tmp_path / "b", au="ssn")
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- CLI


def test_cli_export_onnx_and_info(tmp_path: Path) -> None:
    files = [str(_user_onnx(tmp_path / f"f{i}.onnx", seed=i)) for i in range(2)]
    out = tmp_path / "bundle"
    args = [
        "export",
        "--onnx",
        *files,
        "--classes",
        "background,lesion",
        "--tile",
        "32",
        "-o",
        str(out),
    ]
    res = runner.invoke(app, [*args, "--norm-mean", "0.5", "--norm-std", "2", "--no-calibrate"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and "already exists; pass --overwrite" in res.output
    res = runner.invoke(app, ["info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert Path(info["path"]) == out and info["num_members"] == 2
    assert info["classes"] == ["background", "lesion"]
    assert info["input"]["normalization"]["mean"] == 0.5 and info["input"]["tile_size"] == [32, 32]
    assert [m["file"] for m in info["members"]] == ["member_0.onnx", "member_1.onnx"]
    assert info["members"][1]["sha256"] == sha256_file(out / "member_1.onnx")
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code == 0 and "softmax (AU) x ensemble (EU)" in res.output
    with open(out / "member_1.onnx", "ab") as f:
        f.write(b"\0")
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code != 0 and "checksum mismatch" in res.output
    res = runner.invoke(
        app, ["export", "--checkpoints", str(tmp_path / "none"), "-o", str(tmp_path / "x")]
    )
    assert res.exit_code != 0 and "no such checkpoint folder" in res.output
    res = runner.invoke(app, ["export", "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "exactly one of" in res.output


# ---------------------------------------------------------------- recipes and shipped bundles


def test_every_combination_has_a_recipe() -> None:
    found = {load_recipe(p).combination: p for p in sorted((ROOT / "export").glob("*.toml"))}
    assert sorted(found) == sorted(COMBINATIONS)
    for comb, path in found.items():
        assert path.stem == comb
        r = load_recipe(path)
        au, eu = parse_combination(comb)
        # eu none has one member; ensembles and MC dropout need several to disagree
        assert (r.num_members == 1) if eu == "none" else (r.num_members >= 2), path
        assert (r.num_samples == 1) == (au == "softmax")
        assert (r.model.dropout > 0) == (eu == "mcdropout")


@pytest.mark.parametrize(("name", "m", "s"), [("softmax-ensemble", 5, 1), ("ssn-ensemble", 5, 16)])
def test_shipped_bundles(name: str, m: int, s: int) -> None:
    path = BUNDLES_DIR / name
    if not path.is_dir():
        pytest.fail(f"{path} missing: build it with scripts/build_bundles.sh")
    bundle = load_bundle(name)  # verifies every member's sha256
    man = bundle.manifest
    assert (man.name, man.num_members, man.num_samples) == (name, m, s)
    assert man.classes == ("background", "lesion") and man.ood.threshold is not None
    assert sum(f.stat().st_size for f in path.iterdir()) <= 5 * 2**20
    h, w = man.input.tile_size
    feeds = parity_feeds(man.input.channels, (h, w))
    for i in range(m):
        sess = _session(bundle.member_path(i))
        assert [x.name for x in sess.get_inputs()] == ["image", "seed", "offset", "valid"]
        outs = sess.run(list(OUTS), feeds)
        assert outs[0].shape == (2, man.num_classes, h, w) and outs[2].shape == (
            2,
            s,
            man.num_classes,
        )


def _table_keys(table: str) -> list[str]:
    """The first column of `uqserve info`'s table; a long value wraps (under a long tmp path)
    onto continuation lines whose key cell is empty, so those are not rows."""
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.count("│") == 3]
    return [cell for cell in cells if cell]


def test_export_then_info_and_calibrate_then_info_show_the_same_validation(
    tmp_path: Path,
) -> None:
    """`uqserve export` and `uqserve calibrate` write the same keys; info shows them all."""
    files = [str(_user_onnx(tmp_path / f"f{i}.onnx", seed=i)) for i in range(2)]
    out = tmp_path / "bundle"
    res = runner.invoke(app, ["export", "--onnx", *files, "--tile", "32", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output

    def info() -> tuple[dict[str, object], str]:
        as_json = runner.invoke(app, ["info", str(out), "--json"])
        table = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
        assert as_json.exit_code == 0 and table.exit_code == 0, as_json.output + table.output
        return json.loads(as_json.output), table.output

    exported, table = info()
    assert tuple(exported["validation"]) == VALIDATION_KEYS  # type: ignore[arg-type]
    for key in (*VALIDATION_KEYS, "delta_mean"):
        assert f".{key} " in table, key
    small = ["--n-test", "4", "--n-val", "4", "--n-ood", "2", "--size", "32", "-q"]
    res = runner.invoke(app, ["calibrate", str(out), *small])
    assert res.exit_code == 0, res.output
    calibrated, table_after = info()
    assert calibrated["manifest_version"] == 2
    assert tuple(calibrated["validation"]) == tuple(exported["validation"])  # type: ignore[arg-type]
    assert set(calibrated["entanglement"]) == set(exported["entanglement"])  # type: ignore[arg-type]
    assert _table_keys(table_after) == _table_keys(table)
