"""The one atomic writer (``uqserve._fs``) and the modes of everything written through it.

Under umask 022 every file a writer leaves is 0644 and every folder 0755, as
any other program's would be (``mkstemp``/``mkdtemp`` make them private: a
manifest left 0600 by ``uqserve calibrate`` broke a server running as another
user). Under umask 077 they are private: the umask is respected, not replaced.
Predict's output folders have their own test
(``tests/test_predict_kills_and_races.py::test_outputs_follow_the_umask_alike``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests._bundles import make_tiny_bundle
from uqserve import _fs
from uqserve.bundle import load_bundle, write_manifest


@pytest.fixture
def umask022() -> Iterator[None]:
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def _modes(root: Path) -> dict[str, int]:
    """Mode bits of ``root`` and of everything under it, by relative path."""
    found = {".": root.stat().st_mode & 0o777}
    for p in sorted(root.rglob("*")):
        if not p.is_symlink():
            found[str(p.relative_to(root))] = p.stat().st_mode & 0o777
    return found


def _assert_public(root: Path) -> None:
    """Files 0644 and folders 0755 under ``root``; no temp file left beside anything."""
    modes = _modes(root)
    for rel, mode in modes.items():
        want = 0o755 if (root / rel).is_dir() else 0o644
        assert mode == want, f"{rel}: {oct(mode)}, want {oct(want)} ({modes})"
    assert not [p for p in root.rglob("*.part*")], list(root.rglob("*"))


# --------------------------------------------------------------------------- the writer itself


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_file_and_folder_writer_follows_the_umask(tmp_path: Path, umask: int) -> None:
    before = os.umask(umask)
    try:
        _fs.atomic_write_bytes(tmp_path / "a.bin", b"a")
        _fs.atomic_write_text(tmp_path / "b.txt", "b", fsync=True)
        with _fs.atomic_file(tmp_path / "c.json", "w") as f:
            f.write("{}")
        with _fs.atomic_path(tmp_path / "d.nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.unlink()  # a writer that makes a new file by name
            tmp.write_bytes(b"d")
        staged = _fs.write_temp_file(tmp_path, b"e", fsync=True)
        _fs.commit_file(staged, tmp_path / "e.bin", fsync=True)
        with _fs.replace_dir_atomically(tmp_path / "folder", fsync=True) as tmp:
            (tmp / "inner.txt").write_text("f")
    finally:
        os.umask(before)
    modes = _modes(tmp_path)
    files = {k: v for k, v in modes.items() if k not in (".", "folder")}
    assert set(files.values()) == {0o666 & ~umask}, modes
    assert modes["folder"] == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.bin", "b.txt", "c.json", "d.nii.gz", "e.bin", "folder",
    ]  # fmt: skip
    assert (tmp_path / "d.nii.gz").read_bytes() == b"d"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"), _fs.atomic_file(target, "w") as f:
        f.write("half")
        raise RuntimeError("mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    staged = _fs.write_temp_file(tmp_path, b"x")
    with pytest.raises(FileNotFoundError):
        _fs.commit_file(staged, tmp_path / "missing-folder" / "x")
    assert not staged.exists()
    with pytest.raises(ValueError, match="mode"), _fs.atomic_file(target, "a"):
        pass


# --------------------------------------------------------------------------- each writer


@pytest.mark.usefixtures("umask022")
def test_manifest_writer_leaves_0644(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    os.chmod(bundle / "manifest.json", 0o600)  # as mkstemp left it before
    write_manifest(bundle, load_bundle(bundle).manifest)
    assert _modes(bundle)["manifest.json"] == 0o644


@pytest.mark.usefixtures("umask022")
def test_calibrate_leaves_the_manifest_and_its_backup_0644(tmp_path: Path) -> None:
    from uqserve.calibration import calibrate

    bundle = make_tiny_bundle(tmp_path / "b")
    calibrate(
        bundle, "synthetic", device="cpu", n_test=2, n_val=4, n_ood=2, size=(32, 32),
        shifts=("noise",), severities=(1.0,),
    )  # fmt: skip
    modes = _modes(bundle)
    assert modes["manifest.json"] == modes["manifest.v1.json"] == 0o644, modes
    assert json.loads((bundle / "manifest.json").read_text())["manifest_version"] == 2


@pytest.mark.usefixtures("umask022")
def test_write_nifti_leaves_0644(tmp_path: Path) -> None:
    from uqserve.data.folder import write_nifti

    (tmp_path / "d").mkdir()
    write_nifti(np.zeros((4, 4, 2), np.float32), tmp_path / "d" / "x.nii.gz")
    _assert_public(tmp_path / "d")


@pytest.mark.usefixtures("umask022")
def test_export_writes_a_public_bundle(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from uqserve.exporting import export_onnx_members

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [1.0, -1.0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"])],
        "user",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, "h", "w"])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "user.onnx"))
    export_onnx_members([tmp_path / "user.onnx"], tmp_path / "out" / "b", tile_size=(32, 32))
    _assert_public(tmp_path / "out")


@pytest.mark.usefixtures("umask022")
def test_serving_repository_is_public(tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc")
    from uqserve.serving import write_repository

    bundle = make_tiny_bundle(tmp_path / "b")
    write_repository([bundle], tmp_path / "repo" / "r")
    _assert_public(tmp_path / "repo")


@pytest.mark.usefixtures("umask022")
def test_sidecar_spool_outputs_and_dead_letters_are_0644(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from uqserve.sidecar.outputs import write_datasets
    from uqserve.sidecar.sender import dead_letter
    from uqserve.sidecar.spool import Spool

    spool = Spool(tmp_path / "spool")
    stored = spool.store("1.2.3", "1.2.3.4", b"DICM")
    work = spool.claim(stored.parent.name)
    spool.save_state(spool.load_state(work.name))
    assert (work / "state.json").is_file()
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = (
        "1.2.840.10008.5.1.4.1.1.7",
        generate_uid(),
        "OT",
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    [written] = write_datasets([ds], tmp_path / "spool" / "out" / "s")
    dead_letter({written: "PACS refused"}, tmp_path / "spool" / "dead-letter" / "s")
    _assert_public(tmp_path / "spool")


@pytest.mark.usefixtures("umask022")
def test_train_writes_a_public_checkpoint_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from uqserve.models import ModelConfig
    from uqserve.training import TrainConfig, train

    config = TrainConfig(steps=2, batch_size=2, size=(32, 32), num_images=4, image_size=32,
                         swag_snapshots=2, swag_every=1,
                         validate=0, threads=1, warmup_steps=1)  # fmt: skip
    # collect_swag: swag.safetensors too (safetensors makes its files 0600 by itself).
    train("softmax-none", tmp_path / "ck", config=config, model_config=ModelConfig(width=4),
          collect_swag=True)  # fmt: skip
    assert (tmp_path / "ck" / "swag.safetensors").is_file()
    _assert_public(tmp_path / "ck")


@pytest.mark.usefixtures("umask022")
def test_evaluate_writes_a_public_results_folder(tmp_path: Path) -> None:
    from uqserve.evaluate import evaluate

    bundle = make_tiny_bundle(tmp_path / "b")
    evaluate([bundle], "synthetic", tmp_path / "out" / "eval", device="cpu", n_test=2,
             n_val=4, n_ood=2, size=(32, 32), shifts=("noise",), severities=(1.0,),
             figures=False)  # fmt: skip
    _assert_public(tmp_path / "out")
