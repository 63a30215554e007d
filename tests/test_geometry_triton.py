"""3D bundles through the real tritonserver: both repository flavours agree with embedded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tests._triton import TRITON_MARKS
from tests.test_geometry import EXAMPLE4D, _user_onnx_3d
from uqserve.bundle import Normalization, load_bundle
from uqserve.prediction import predict_volume
from uqserve.runtime.embedded import EmbeddedRuntime
from uqserve.runtime.triton import TritonRuntime
from uqserve.serving import TritonServer, write_repository
from uqserve.volumes import read_volume

pytestmark = TRITON_MARKS


def test_3d_bundle_through_triton_equals_embedded(tmp_path: Path) -> None:
    """Python flavour with the server-side reduction step (its 3D graph loads), served."""
    from uqserve.exporting import export_onnx_members

    files = [_user_onnx_3d(tmp_path / f"fold{i}.onnx", i) for i in range(2)]
    export_onnx_members(
        files, tmp_path / "b3d", dims=3, patch=(8, 32, 32), spacing=(3.0, 2.5, 2.5),
        orientation="RAS", normalization=Normalization("zscore"),
        name="geo3d",
    )  # fmt: skip
    bundle = load_bundle(tmp_path / "b3d")
    vol = read_volume(EXAMPLE4D, volume_index=0)
    vol = dataclasses.replace(vol, data=np.ascontiguousarray(vol.data[:64, :48]))
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(vol, runtime=emb, batch_size=2, want_samples=True)
    repo = write_repository(bundle, tmp_path / "repo", "python", instances=1, reduce="server")
    with TritonServer(repo) as srv, TritonRuntime(bundle, [srv.grpc_url]) as rt:
        got = predict_volume(vol, runtime=rt, batch_size=3, want_samples=True)
    assert got.report["geometry"]["windows"] == want.report["geometry"]["windows"] > 1
    for name in ("prob", "tu", "au", "eu"):
        diff = float(np.abs(getattr(got, name) - getattr(want, name)).max())
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"
    assert np.array_equal(got.seg, want.seg)
    assert np.array_equal(got.sample_counts, want.sample_counts)
    assert got.sample_labels is not None and want.sample_labels is not None
    assert np.array_equal(got.sample_labels, want.sample_labels)


def _nnunet_like_bundle(tmp_path: Path) -> Path:
    """Two 3D folds padded, weighed and blended as nnU-Net's (constant 0 centred, its
    Gaussian, float16 logit sums), whose graphs return their logits as nnU-Net members do."""
    import onnx

    from uqserve.bundle import Member, Padding, sha256_file, write_manifest
    from uqserve.exporting import export_onnx_members
    from uqserve.exporting._onnx import wrap_onnx_member

    files = [_user_onnx_3d(tmp_path / f"fold{i}.onnx", i) for i in range(2)]
    export_onnx_members(
        files, tmp_path / "nn", dims=3, patch=(8, 32, 32), spacing=(3.0, 2.5, 2.5),
        orientation="RAS", normalization=Normalization("zscore"), name="nnlike",
        pad=Padding("constant", 0.0, True),
    )  # fmt: skip
    man = load_bundle(tmp_path / "nn").manifest
    members = []
    for f, m in zip(files, man.members, strict=True):
        model, _, _ = wrap_onnx_member(f, num_classes=2, dims=3, keep_logits=True)
        onnx.save(model, str(tmp_path / "nn" / m.file))
        members.append(Member(file=m.file, sha256=sha256_file(tmp_path / "nn" / m.file)))
    inp = dataclasses.replace(man.input, gaussian="nnunet")
    write_manifest(tmp_path / "nn", dataclasses.replace(man, members=tuple(members), input=inp))
    return tmp_path / "nn"


def test_nnunet_like_bundle_through_triton_blends_the_members_logits(tmp_path: Path) -> None:
    """Triton serves the members' optional logits and the client blends them in float16 as
    the embedded runtime does, so nnU-Net bundles give the same maps on both. Catches a
    repository or client that drops the logits (then log p is blended in float32, which
    misses nnU-Net's float16 rounding)."""
    bundle = load_bundle(_nnunet_like_bundle(tmp_path))
    assert bundle.manifest.input.blend == "logits"
    vol = read_volume(EXAMPLE4D, volume_index=0)
    vol = dataclasses.replace(vol, data=np.ascontiguousarray(vol.data[:64, :48, :5]))
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(vol, runtime=emb, batch_size=2)
    repo = write_repository(bundle, tmp_path / "repo", "python", instances=1)
    assert 'name: "logits_1"' in (repo / "nnlike" / "config.pbtxt").read_text()
    with TritonServer(repo) as srv, TritonRuntime(bundle, [srv.grpc_url]) as rt:
        got = predict_volume(vol, runtime=rt, batch_size=3)
    assert got.report["geometry"]["windows"] == want.report["geometry"]["windows"] > 1
    for name in ("prob", "tu", "au", "eu"):
        diff = float(np.abs(getattr(got, name) - getattr(want, name)).max())
        assert diff <= 1e-6, f"{name}: max abs difference {diff}"
    assert np.array_equal(got.seg, want.seg)


def test_3d_repository_declares_volumes(tmp_path: Path) -> None:
    """The onnxruntime flavour's configs carry the volumetric dims of the contract."""
    from uqserve.exporting import export_onnx_members

    files = [_user_onnx_3d(tmp_path / "fold0.onnx", 0)]
    export_onnx_members(files, tmp_path / "b", dims=3, patch=(8, 32, 32))
    repo = write_repository(tmp_path / "b", tmp_path / "repo", "onnxruntime", instances=1)
    text = (repo / "b_member_0" / "config.pbtxt").read_text()
    for name, dims in [
        ("image", "[1, -1, -1, -1]"), ("valid", "[3]"), ("mean", "[2, -1, -1, -1]"),
        ("sample_entropy", "[-1, -1, -1]"), ("sample_labels", "[1, -1, -1, -1]"),
    ]:  # fmt: skip
        assert f'name: "{name}"' in text
        block = text.split(f'name: "{name}"', 1)[1].split("}", 1)[0]
        assert f"dims: {dims}" in block, (name, block)
