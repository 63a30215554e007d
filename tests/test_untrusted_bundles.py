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


# --------------------------------------------------------------------------- helpers


def _conv_onnx(
    path: Path, *, channels: int = 1, k: int = 2, weight: float = 1.0, dims: int = 2
) -> Path:
    """A plain user graph ``[B, C, *sp] -> [B, K, *sp]`` (a 1x1 convolution), onnx API only."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = (weight * rng.normal(size=(k, channels, *[1] * dims))).astype(np.float32)
    sp = ["H", "W"] if dims == 2 else ["D", "H", "W"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "user",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", channels, *sp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", k, *sp])],
        initializer=[numpy_helper.from_array(w, "w")],
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
