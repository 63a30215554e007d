"""Bundles, ONNX files and checkpoints are untrusted input: refused at the door, one line.

Names that would become paths, member files outside the bundle, repeated
members and tampered fields are refused when the bundle is loaded (or at
export), naming the bundle and the field; nothing is written anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests._bundles import make_tiny_bundle
from uqserve.bundle import MANIFEST_NAME, BundleError, load_bundle, sha256_file
from uqserve.cli import app
from uqserve.errors import UsageError
from uqserve.serving import write_repository

runner = CliRunner()
pytestmark = pytest.mark.invalid_json_outputs  # tampered manifests on purpose


def _tamper(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Rewrite ``bundle``'s manifest through ``edit`` (no validation on the way)."""
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return bundle


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d[key] = value

    return edit


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_line_failure(result: Any) -> str:
    """The CLI failed with exactly one line of error, no traceback."""
    assert result.exit_code != 0, result.output
    out = result.output.strip()
    assert "Traceback" not in out and "internal error" not in out, out
    assert len(out.splitlines()) == 1, out
    return out


# --------------------------------------------------------------------------- 1: names


@pytest.mark.parametrize(
    "name",
    ["sub/../../outside", "/tmp/uqserve-abs", "two\nlines", ".hidden", "", "a" * 65, "tab\tname"],
)
def test_a_bundle_name_that_is_not_a_model_name_is_refused_at_load(
    tmp_path: Path, name: str
) -> None:
    bundle = _tamper(make_tiny_bundle(tmp_path / "b"), _set("name", name))
    with pytest.raises(BundleError, match=r"manifest\.json: name .* is not a valid bundle name"):
        load_bundle(bundle)


def test_valid_names_still_load(tmp_path: Path) -> None:
    for name in ("softmax-ensemble", "Liver_v2.1", "0abc"):
        assert load_bundle(make_tiny_bundle(tmp_path / name)).manifest.name == name


def test_repo_never_writes_outside_its_output_folder(tmp_path: Path) -> None:
    """A Bundle built in memory with a path-like name (bypassing load) is refused where
    the repository joins the model name to its folder; nothing appears anywhere."""
    import dataclasses

    good = load_bundle(make_tiny_bundle(tmp_path / "b"))
    evil = dataclasses.replace(good, manifest=dataclasses.replace(good.manifest, name="../evil"))
    work = tmp_path / "work"
    work.mkdir()
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match=r"'\.\./evil_member_0' is not a folder name inside"):
        write_repository(evil, work / "repo")
    assert _tree(tmp_path) == before


def test_cli_repo_refuses_a_tampered_name_in_one_line(tmp_path: Path) -> None:
    bundle = _tamper(make_tiny_bundle(tmp_path / "b"), _set("name", "../../up"))
    before = _tree(tmp_path)
    out = _one_line_failure(runner.invoke(app, ["repo", str(bundle), "-o", str(tmp_path / "r")]))
    assert "manifest.json" in out and "name '../../up'" in out
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", ["../x", "a/b", "x\x1b]0;t\x07"])
def test_export_onnx_refuses_a_path_as_name(tmp_path: Path, name: str) -> None:
    src = _conv_onnx(tmp_path / "m.onnx")
    before = _tree(tmp_path)
    args = ["export", "--onnx", str(src), "-o", str(tmp_path / "out" / "b"), "--name", name]
    out = _one_line_failure(runner.invoke(app, [*args, "--no-calibrate", "-q"]))
    assert "is not a valid bundle name" in out
    assert _tree(tmp_path) == before


def test_export_onnx_refuses_an_output_folder_name_that_is_no_bundle_name(tmp_path: Path) -> None:
    src = _conv_onnx(tmp_path / "m.onnx")
    out = _one_line_failure(
        runner.invoke(app, ["export", "--onnx", str(src), "-o", str(tmp_path / "my bundle")])
    )
    assert "'my bundle'" in out and "--name" in out
    assert not (tmp_path / "my bundle").exists()


# --------------------------------------------------------------------------- 3: member files


def _member_file(value: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d["members"][1]["file"] = value

    return edit


@pytest.mark.parametrize("file", ["../other/member_1.onnx", "sub/../../x.onnx", "ABS"])
def test_a_member_file_outside_the_bundle_is_refused(tmp_path: Path, file: str) -> None:
    other = make_tiny_bundle(tmp_path / "other")
    target = str((other / "member_1.onnx").resolve()) if file == "ABS" else file
    bundle = make_tiny_bundle(tmp_path / "b")

    def edit(d: dict[str, Any]) -> None:
        d["members"][1] = {"file": target, "sha256": sha256_file(other / "member_1.onnx")}

    _tamper(bundle, edit)
    with pytest.raises(BundleError, match=r"manifest\.json: member file .* inside the bundle"):
        load_bundle(bundle)


def test_a_symlink_leaving_the_bundle_is_refused(tmp_path: Path) -> None:
    other = make_tiny_bundle(tmp_path / "other")
    bundle = make_tiny_bundle(tmp_path / "b")
    (bundle / "member_1.onnx").unlink()
    (bundle / "member_1.onnx").symlink_to(other / "member_1.onnx")
    _tamper(bundle, lambda d: d["members"][1].update(sha256=sha256_file(other / "member_1.onnx")))
    with pytest.raises(BundleError, match=r"members\[1\]\.file 'member_1\.onnx' leads outside"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match="leads outside"):  # also without checksums
        load_bundle(bundle, verify=False)


def test_a_symlink_inside_the_bundle_is_fine(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    (bundle / "store").mkdir()
    os.replace(bundle / "member_1.onnx", bundle / "store" / "m1.onnx")
    (bundle / "member_1.onnx").symlink_to(Path("store") / "m1.onnx")
    assert load_bundle(bundle).member_path(1).resolve() == (bundle / "store/m1.onnx").resolve()


# --------------------------------------------------------------------------- 8: tampered fields


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["ood"].update(threshold=float("nan")), "ood.threshold"),
        (lambda d: d["ood"].update(threshold=float("inf")), "ood.threshold"),
        (lambda d: d["ood"].update(quantile=float("nan")), "ood.quantile"),
        (lambda d: d["input"].update(tile_size=[0, 32]), "input.tile_size"),
        (lambda d: d["input"].update(tile_size=[-16, -16]), "input.tile_size"),
        (lambda d: d["input"].update(multiple=0), "input.multiple"),
    ],
)
def test_tampered_numbers_are_refused_at_load(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    bundle = _tamper(make_tiny_bundle(tmp_path / "b"), edit)
    with pytest.raises(BundleError, match=rf"manifest\.json: .*{field.replace('.', '[.]')}"):
        load_bundle(bundle)


def _bundle_with_bad_member(tmp_path: Path, bad: Path, outputs: str, dims: int = 2) -> Path:
    """A two-member bundle exported from good graphs, then member 1 swapped for ``bad``
    wrapped into the member contract, with a matching checksum (a careful tamperer)."""
    import onnx

    from uqserve.exporting import export_onnx_members, wrap_onnx_member

    good = [_conv_onnx(tmp_path / f"g{i}.onnx", weight=1.0 + i, dims=dims) for i in range(2)]
    patch = (4, 16, 16) if dims == 3 else None
    bundle = export_onnx_members(
        good, tmp_path / "tampered", calibrate=False, dims=dims, patch=patch
    ).path
    model, _, _ = wrap_onnx_member(bad, num_classes=2, outputs=outputs, dims=dims)
    onnx.save(model, str(bundle / "member_1.onnx"))
    digest = sha256_file(bundle / "member_1.onnx")
    return _tamper(bundle, lambda d: d["members"][1].update(sha256=digest))


@pytest.mark.parametrize(
    ("kw", "outputs", "reason"),
    [
        ({"weight": float("nan")}, "logits", "NaN"),
        ({"weight": float("nan"), "dims": 3}, "logits", "NaN"),  # windows stitched in 3D
        ({"act": "SumOne", "weight": 5.0}, "probs", "negative probability"),
        ({"act": "Sigmoid"}, "probs", "do not sum to 1"),
    ],
)
def test_a_member_giving_no_probabilities_is_blamed_on_the_bundle(
    tmp_path: Path, kw: dict[str, Any], outputs: str, reason: str
) -> None:
    from tests.conftest import blob_volume, write_nifti

    bad = _conv_onnx(tmp_path / "bad.onnx", **kw)
    bundle = _bundle_with_bad_member(tmp_path, bad, outputs, dims=int(kw.get("dims", 2)))
    scans = [
        write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume((24, 20, 3), seed=i)) for i in (1, 2)
    ]
    out = tmp_path / "out"
    args = ["predict", *map(str, scans), "--bundle", str(bundle), "-o", str(out), "--device"]
    result = runner.invoke(app, [*args, "cpu"])
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "internal error" not in err, result.output
    assert "bundle tampered: member 1 (member_1.onnx) output mean" in err and reason in err, err
    assert not any(out.rglob("*.nii.gz"))


@pytest.mark.parametrize(
    ("kw", "outputs", "needle"),
    [
        ({"weight": float("nan")}, "logits", "its output contains NaN"),
        ({"act": "Relu"}, "probs", "do not sum to 1"),
        ({"act": "Tile2", "declared_k": "K"}, "logits", "outputs 4 channels"),
    ],
)
def test_export_onnx_refuses_graphs_that_give_no_probabilities(
    tmp_path: Path, kw: dict[str, Any], outputs: str, needle: str
) -> None:
    bad = _conv_onnx(tmp_path / "bad.onnx", **kw)
    out = tmp_path / "b"
    args = ["export", "--onnx", str(bad), "-o", str(out), "--outputs", outputs, "--no-calibrate"]
    err = _one_line_failure(runner.invoke(app, args))
    assert str(bad) in err and needle in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- helpers


def _conv_onnx(
    path: Path,
    *,
    channels: int = 1,
    k: int = 2,
    weight: float = 1.0,
    dims: int = 2,
    act: str | None = None,
    declared_k: int | str | None = None,
) -> Path:
    """A plain user graph ``[B, C, *sp] -> [B, K, *sp]`` (a 1x1 convolution, then ``act``),
    onnx API only; ``declared_k`` is the output's declared class axis (default ``k``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = (weight * rng.normal(size=(k, channels, *[1] * dims))).astype(np.float32)
    sp = ["H", "W"] if dims == 2 else ["D", "H", "W"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c" if act else "y"])]
    if act == "Tile2":  # twice the classes, in a way shape inference cannot see
        reps = [numpy_helper.from_array(np.array([1, 2] + [1] * dims, np.int64), "reps")]
        nodes += [
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Mul", ["xs", "zero"], ["xz"]),
            helper.make_node("Add", ["xz", "reps"], ["r"]),
            helper.make_node("Tile", ["c", "r"], ["y"]),
        ]
        extra = [*reps, numpy_helper.from_array(np.zeros(dims + 2, np.int64), "zero")]
    elif act == "SumOne":  # [1 - c, c] from one channel: sums to 1, negative somewhere
        w = w[:1]
        nodes += [
            helper.make_node("Sub", ["one", "c"], ["d"]),
            helper.make_node("Concat", ["d", "c"], ["y"], axis=1),
        ]
        extra = [numpy_helper.from_array(np.ones((), np.float32), "one")]
    elif act:
        nodes.append(helper.make_node(act, ["c"], ["y"]))
    kk = k if declared_k is None else declared_k
    graph = helper.make_graph(
        nodes,
        "user",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", channels, *sp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", kk, *sp])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            *(extra if act in ("Tile2", "SumOne") else []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- 4: sidecar allow-list


@pytest.mark.parametrize("allow", [None, "", " , ", ","])
def test_sidecar_without_an_allow_list_refuses_to_start(tmp_path: Path, allow: str | None) -> None:
    spool = tmp_path / "spool"
    args = ["sidecar", "--spool", str(spool), "--listen", "127.0.0.1:11999", "--device", "cpu"]
    args += [] if allow is None else ["--allow", allow]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "--allow" in result.stderr and "--allow-any" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not spool.exists()  # refused before anything was created


def test_sidecar_allow_any_is_an_explicit_choice(tmp_path: Path) -> None:
    """With --allow-any the allow-list check passes; the next check (the bundle) speaks."""
    spool = tmp_path / "spool"
    args = ["sidecar", "--spool", str(spool), "--listen", "127.0.0.1:11999", "--allow-any"]
    result = runner.invoke(app, [*args, "--bundle", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such bundle" in result.stderr, result.stderr


def test_sidecar_config_without_an_allow_list_is_refused_in_python(tmp_path: Path) -> None:
    """The Python entry fails closed as the CLI does: no allow-list and no allow_any is refused."""
    from uqserve.sidecar import SidecarConfig

    with pytest.raises(UsageError, match="allow_any"):
        SidecarConfig(spool=tmp_path / "spool")
    assert SidecarConfig(spool=tmp_path / "spool", allow=("PACS",)).allow == ("PACS",)
    assert SidecarConfig(spool=tmp_path / "spool", allow_any=True).allow_any


# --------------------------------------------------------------------------- 5: repeated members


def test_export_onnx_refuses_the_same_graph_twice(tmp_path: Path) -> None:
    a = _conv_onnx(tmp_path / "a.onnx")
    b = _conv_onnx(tmp_path / "b.onnx", weight=2.0)
    copy = tmp_path / "copy_of_a.onnx"
    copy.write_bytes(a.read_bytes())
    for files, dup in (([a, b, a], "a.onnx"), ([a, b, copy], "copy_of_a.onnx")):
        out = tmp_path / "bundle"
        args = ["export", "--onnx", *map(str, files), "-o", str(out), "--no-calibrate"]
        err = _one_line_failure(runner.invoke(app, args))
        assert f"{dup} has the same weights as {a}" in err and "EU = 0" in err, err
        assert not out.exists()


def test_a_manifest_listing_one_graph_twice_is_refused_at_load(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    _tamper(bundle, lambda d: d["members"].__setitem__(1, dict(d["members"][0])))
    with pytest.raises(BundleError, match=r"members: two members are the same graph"):
        load_bundle(bundle)
