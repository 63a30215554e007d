"""Triton model repositories from real bundles, checked with Triton's schema and the graphs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from uqserve.bundle import BUNDLES_DIR, DEFAULT_BUNDLE, BundleError, load_bundle
from uqserve.cli import app
from uqserve.serving import (
    MANIFEST_PARAMETER,
    RepositoryError,
    manifest_identity,
    validate_repository,
    write_repository,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "model_repository"
ONNX_TYPES = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8,
}


def files_of(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if not p.is_dir() and "__pycache__" not in p.parts
    }


def check_against_graphs(repo: Path) -> int:
    """Independent of ``validate_repository``: parse every config with Triton's schema
    and check each tensor against the ONNX graph (via ``onnx``) or the step it maps.
    Returns the number of tensors checked."""
    configs = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        config = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
        assert config.name == cfg_path.parent.name
        configs[config.name] = config
    assert configs, f"no configs in {repo}"
    checked = 0
    for name, config in configs.items():
        if config.platform == "ensemble":
            continue
        graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
        values = {v.name: v for v in [*graph.input, *graph.output]}
        for t in [*config.input, *config.output]:
            assert t.name in values, f"{name}: {t.name} not in graph"
            tt = values[t.name].type.tensor_type
            assert ONNX_TYPES[tt.elem_type] == t.data_type, f"{name}.{t.name}: type"
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            assert len(tt.shape.dim) == 1 + len(dims), f"{name}.{t.name}: rank"
            for c, g in zip(dims, list(tt.shape.dim)[1:], strict=True):
                if c != -1 and g.HasField("dim_value"):
                    assert c == g.dim_value, f"{name}.{t.name}: dims"
            checked += 1
        assert {i.name for i in graph.input} == {t.name for t in config.input}
    for config in configs.values():
        if config.platform != "ensemble":
            continue
        produced = {}
        for step in config.ensemble_scheduling.step:
            member = configs[step.model_name]
            member_in = {t.name: t for t in member.input}
            member_out = {t.name: t for t in member.output}
            for key, value in step.input_map.items():
                ens_in = {t.name: t for t in config.input}[value]
                assert ens_in.data_type == member_in[key].data_type
                assert list(ens_in.dims) == list(member_in[key].dims)
                checked += 1
            for key, value in step.output_map.items():
                produced[value] = member_out[key]
        assert {t.name for t in config.output} == set(produced)
        for t in config.output:
            assert (t.data_type, list(t.dims)) == (
                produced[t.name].data_type,
                list(produced[t.name].dims),
            )
            checked += 1
    return checked


@pytest.mark.parametrize("flavour", ["python", "onnxruntime"])
def test_repository_matches_triton_schema_and_graphs(
    tmp_path: Path, tiny_bundle: Path, tiny_softmax_bundle: Path, flavour: str
) -> None:
    repo = write_repository([tiny_bundle, tiny_softmax_bundle], tmp_path / "repo", flavour)
    names = validate_repository(repo)
    assert names == sorted(
        [
            "tiny-ssn",
            "tiny-ssn_nosamples",
            "tiny-ssn_member_0",
            "tiny-ssn_member_1",
            "tiny-softmax",
            "tiny-softmax_nosamples",
            *[f"tiny-softmax_member_{m}" for m in range(3)],
        ]
    )
    # 2 members x 8 tensors + 3 x 8, plus ensemble inputs and outputs.
    assert check_against_graphs(repo) > 2 * 8 + 3 * 8

    ens = text_format.Parse((repo / "tiny-ssn" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [o.name for o in ens.output] == [
        f"{n}_{m}"
        for m in range(2)
        for n in ("mean", "sample_entropy", "sample_counts", "sample_labels")
    ]
    lean = text_format.Parse(
        (repo / "tiny-ssn_nosamples" / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    assert not any(o.name.startswith("sample_labels") for o in lean.output)
    assert not any("sample_labels" in s.output_map for s in lean.ensemble_scheduling.step)
    identity = json.loads(ens.parameters[MANIFEST_PARAMETER].string_value)
    assert identity == manifest_identity(load_bundle(tiny_bundle))
    assert identity["members"] == [m.sha256 for m in load_bundle(tiny_bundle).manifest.members]

    member = text_format.Parse(
        (repo / "tiny-ssn_member_0" / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    assert member.dynamic_batching.max_queue_delay_microseconds >= 0
    assert member.HasField("dynamic_batching")
    kind = member.instance_group[0].kind
    if flavour == "python":
        assert member.backend == "python" and kind == mc.ModelInstanceGroup.KIND_CPU
        assert member.instance_group[0].count == 2
        assert (repo / "tiny-ssn_member_0" / "1" / "model.py").is_file()
        # Triton 2.51 (pip server) rejects this field.
        assert ens.ensemble_scheduling.max_inflight_requests == 0
    else:
        assert member.platform == "onnxruntime_onnx" and kind == mc.ModelInstanceGroup.KIND_GPU
        assert not (repo / "tiny-ssn_member_0" / "1" / "model.py").exists()
        assert ens.ensemble_scheduling.max_inflight_requests > 0


def test_output_is_deterministic_and_has_no_absolute_paths(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    a = write_repository(tiny_bundle, tmp_path / "a", "python")
    b = write_repository(tiny_bundle, tmp_path / "b", "python")
    fa, fb = files_of(a), files_of(b)
    assert fa.keys() == fb.keys()
    for rel in fa:
        assert fa[rel].read_bytes() == fb[rel].read_bytes(), rel
    for rel, p in fa.items():
        if rel.endswith(".pbtxt"):
            text = p.read_text()
            assert str(tmp_path) not in text and str(tiny_bundle) not in text
    # The copies are the bundle's own files.
    m0 = a / "tiny-ssn_member_0" / "1" / "model.onnx"
    assert m0.read_bytes() == (tiny_bundle / "member_0.onnx").read_bytes()


def test_symlinked_members_are_relative_and_resolve_to_the_bundle(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    repo = write_repository(
        tiny_bundle, tmp_path / "deep" / "repo", "onnxruntime", member_files="symlink"
    )
    link = repo / "tiny-ssn_member_1" / "1" / "model.onnx"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert link.resolve() == (tiny_bundle / "member_1.onnx").resolve()
    validate_repository(repo)


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


@pytest.mark.parametrize(
    ("model", "old", "new", "expected"),
    [
        (
            "tiny-ssn_member_0",
            'name: "image"\n  data_type: TYPE_FP32',
            'name: "image"\n  data_type: TYPE_FP16',
            "'image' is TYPE_FP16",
        ),
        ("tiny-ssn_member_0", "dims: [1, -1, -1]", "dims: [1, -1]", "rank 3 in the config"),
        (
            "tiny-ssn_member_0",
            'name: "sample_counts"\n  data_type: TYPE_FP32\n  dims: [3, 2]',
            'name: "sample_counts"\n  data_type: TYPE_FP32\n  dims: [4, 2]',
            "axis 1 is 4",
        ),
        ("tiny-ssn_member_1", 'name: "mean"', 'name: "average"', "'average' is not an output"),
        (
            "tiny-ssn",
            'model_name: "tiny-ssn_member_1"',
            'model_name: "tiny-ssn_member_7"',
            "not in the repository",
        ),
        ("tiny-ssn", "input {", "inptu {", "not a valid Triton model config"),
    ],
)
def test_validation_finds_broken_configs(
    tmp_path: Path, tiny_bundle: Path, model: str, old: str, new: str, expected: str
) -> None:
    repo = write_repository(tiny_bundle, tmp_path / "repo", "python")
    _edit(repo / model / "config.pbtxt", old, new)
    with pytest.raises(RepositoryError, match=expected):
        validate_repository(repo)


def test_validation_finds_an_altered_graph(tmp_path: Path, tiny_bundle: Path) -> None:
    repo = write_repository(tiny_bundle, tmp_path / "repo", "python")
    graph = repo / "tiny-ssn_member_0" / "1" / "model.onnx"
    shutil.copyfile(repo / "tiny-ssn_member_1" / "1" / "model.onnx", graph)
    with pytest.raises(RepositoryError, match="sha256 differs"):
        validate_repository(repo)


def test_bad_requests_fail_clearly_and_leave_nothing(tmp_path: Path, tiny_bundle: Path) -> None:
    with pytest.raises(RepositoryError, match="unknown flavour 'tensorrt'"):
        write_repository(tiny_bundle, tmp_path / "r", "tensorrt")
    with pytest.raises(RepositoryError, match="instances must be"):
        write_repository(tiny_bundle, tmp_path / "r", instances=0)
    with pytest.raises(BundleError):
        write_repository(tmp_path / "no-such-bundle", tmp_path / "r")
    with pytest.raises(RepositoryError, match="bundle names must differ"):
        write_repository([tiny_bundle, tiny_bundle], tmp_path / "r")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="not empty; pass `overwrite=True`"):
        write_repository(tiny_bundle, out)
    assert (out / "keep.txt").read_text() == "mine"
    write_repository(tiny_bundle, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "tiny-ssn" / "config.pbtxt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temp folders left


def test_validation_reports_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no such repository"):
        validate_repository(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match="no models"):
        validate_repository(tmp_path / "empty")


def test_cli_repo(tmp_path: Path, tiny_bundle: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "repo"
    result = runner.invoke(
        app,
        ["repo", str(tiny_bundle), "-o", str(out), "--flavour", "onnxruntime", "--instances", "2"],
    )
    assert result.exit_code == 0, result.output
    cfg = text_format.Parse(
        (out / "tiny-ssn_member_0" / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    assert cfg.instance_group[0].count == 2 and cfg.platform == "onnxruntime_onnx"
    result = runner.invoke(app, ["repo", str(tiny_bundle), "-o", str(out)])
    assert result.exit_code == 1
    assert "not empty" in result.output
    result = runner.invoke(
        app, ["repo", str(tiny_bundle), "-o", str(tmp_path / "x"), "--flavour", "gpu"]
    )
    assert result.exit_code == 1 and "unknown flavour 'gpu'" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(
    not (BUNDLES_DIR / DEFAULT_BUNDLE / "manifest.json").is_file(),
    reason=f"the shipped bundle {DEFAULT_BUNDLE} is not exported yet",
)
@pytest.mark.parametrize("flavour", ["python", "onnxruntime"])
def test_committed_model_repository_is_up_to_date(tmp_path: Path, flavour: str) -> None:
    """model_repository/<flavour> is exactly what `uqserve repo` writes for the default bundle.

    Regenerate with: uqserve repo softmax-ensemble -o model_repository/<flavour>
    --flavour <flavour> --link --overwrite
    """
    committed = COMMITTED / flavour
    assert committed.is_dir(), f"{committed} is missing; regenerate it (see docstring)"
    fresh = write_repository(DEFAULT_BUNDLE, tmp_path / flavour, flavour, member_files="symlink")
    want, have = files_of(fresh), files_of(committed)
    assert sorted(have) == sorted(want), "model_repository is stale: regenerate it (see docstring)"
    for rel, path in want.items():
        if path.is_symlink():
            # Link text depends on where the folder lives; the target must not.
            assert have[rel].is_symlink() and not os.path.isabs(os.readlink(have[rel]))
            assert have[rel].resolve() == path.resolve(), rel
        else:
            assert have[rel].read_bytes() == path.read_bytes(), f"{rel} differs: regenerate it"
    validate_repository(committed)
    check_against_graphs(committed)
    bundle = load_bundle(DEFAULT_BUNDLE)
    for m, member in enumerate(bundle.manifest.members):
        data = (committed / f"{bundle.manifest.name}_member_{m}" / "1" / "model.onnx").read_bytes()
        assert hashlib.sha256(data).hexdigest() == member.sha256


# --------------------------------------------------------------------------- reduce on the server


@pytest.mark.parametrize("flavour", ["python", "onnxruntime"])
def test_reduce_server_adds_a_reduction_step_and_its_ensemble(
    tmp_path: Path, tiny_bundle: Path, flavour: str
) -> None:
    from uqserve.serving.repository import REDUCE_PARAMETER

    runner = CliRunner()
    out = tmp_path / "repo"
    result = runner.invoke(
        app, ["repo", str(tiny_bundle), "-o", str(out), "--flavour", flavour, "--reduce", "server"]
    )
    assert result.exit_code == 0, result.output
    assert "tiny-ssn_reduce" in validate_repository(out)
    reduced = text_format.Parse((out / "tiny-ssn_reduced" / "config.pbtxt").read_text(),
                                mc.ModelConfig())  # fmt: skip
    # the members' outputs stay inside the server: only the sums are returned
    assert {t.name for t in reduced.output} == {
        "mean_sum", "entropy_sum", "sample_entropy_sum", "foreground", "sample_counts"
    }  # fmt: skip
    steps = [s.model_name for s in reduced.ensemble_scheduling.step]
    assert steps == ["tiny-ssn_member_0", "tiny-ssn_member_1", "tiny-ssn_reduce"]
    for name in ("tiny-ssn", "tiny-ssn_nosamples", "tiny-ssn_reduced"):
        cfg = text_format.Parse((out / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.parameters[REDUCE_PARAMETER].string_value == "server"
    graph = onnx.load(str(out / "tiny-ssn_reduce" / "1" / "model.onnx"))
    assert len(graph.graph.input) == 3 * 2  # mean, sample_entropy, sample_counts per member
    assert (out / "tiny-ssn_reduce" / "1" / "model.py").is_file() == (flavour == "python")
    # a plain repository has none of it
    plain = write_repository(tiny_bundle, tmp_path / "plain")
    assert not (plain / "tiny-ssn_reduced").exists()
    cfg = text_format.Parse((plain / "tiny-ssn" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert REDUCE_PARAMETER not in cfg.parameters
    with pytest.raises(RepositoryError, match="unknown reduce 'gpu'"):
        write_repository(tiny_bundle, tmp_path / "r", reduce="gpu")


@pytest.mark.parametrize(("members", "samples", "classes"), [(1, 1, 2), (3, 4, 3)])
def test_reduce_graph_gives_what_the_accumulator_adds(
    members: int, samples: int, classes: int
) -> None:
    """The server's sums vs the client adding each member: equal to float32 rounding."""
    import numpy as np
    import onnxruntime as ort

    from uqserve.serving.reduce import reduce_graph
    from uqserve.uncertainty import Accumulator, entropy

    rng = np.random.default_rng(members)
    b, h, w = 2, 5, 7
    feeds = {}
    one = Accumulator(classes, (b, h, w))
    for m in range(members):
        p = np.moveaxis(rng.dirichlet(np.ones(classes) * 0.3, size=(b, h, w)), -1, 1)
        p[0, :, 0, 0] = np.eye(classes)[m % classes]  # exact zeros: 0 ln 0 = 0
        p = p.astype(np.float32)
        hs = (entropy(p, axis=1) * rng.random((b, h, w))).astype(np.float32)  # <= H[p̄_m]
        counts = rng.integers(0, 9, (b, samples, classes)).astype(np.float32)
        feeds |= {f"mean_{m}": p, f"sample_entropy_{m}": hs, f"sample_counts_{m}": counts}
        one.add(np.swapaxes(p, 0, 1), None if samples == 1 else hs)
    sess = ort.InferenceSession(reduce_graph(members, classes, samples),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    assert out["foreground"].dtype == np.bool_
    np.testing.assert_array_equal(
        out["sample_counts"], np.stack([feeds[f"sample_counts_{m}"] for m in range(members)], 1)
    )
    summed = Accumulator(classes, (b, h, w))
    summed.add_sums(np.swapaxes(out["mean_sum"], 0, 1), out["entropy_sum"],
                    None if samples == 1 else out["sample_entropy_sum"], out["foreground"],
                    members)  # fmt: skip
    a, r = one.result(), summed.result()
    np.testing.assert_array_equal(a.mean, r.mean)  # member-order float32 adds, as the client
    np.testing.assert_array_equal(a.member_foreground, r.member_foreground)
    for name in ("tu", "au", "eu", "au_sample", "au_latent"):
        np.testing.assert_allclose(getattr(r, name), getattr(a, name), atol=2e-6, err_msg=name)
