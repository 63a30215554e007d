"""Checkpoint folders: written and read by ``uqserve.checkpoints`` alone, version checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uqserve.checkpoints import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    read_checkpoint_config,
    write_checkpoint_config,
)
from uqserve.models import ModelConfig


def _folder(tmp_path: Path, **overrides: object) -> Path:
    (tmp_path / "member_0.safetensors").write_bytes(b"")  # read_checkpoint_config needs no weights
    config = {
        "combination": "softmax-none",
        "model_config": ModelConfig(width=4).to_dict(),
        "members": [{"file": "member_0.safetensors"}],
    }
    write_checkpoint_config(tmp_path, config)
    record = json.loads((tmp_path / "config.json").read_text())
    record.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(record))
    return tmp_path


def test_the_writer_stamps_format_and_version_and_the_reader_accepts_them(tmp_path: Path) -> None:
    ck = read_checkpoint_config(_folder(tmp_path))
    assert (ck.config["format"], ck.config["version"]) == (FORMAT, FORMAT_VERSION)
    assert list(ck.config)[:3] == ["format", "version", "combination"]
    assert ck.combination == "softmax-none" and ck.files == [tmp_path / "member_0.safetensors"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"version": FORMAT_VERSION + 1}, "newer than this uqserve reads"),
        ({"version": "1"}, "format version '1' is not valid"),
        ({"version": True}, "format version True is not valid"),
        ({"format": "nnunet"}, "not a uqserve checkpoint config"),
        ({"format": None}, "not a uqserve checkpoint config"),
    ],
)
def test_other_formats_and_newer_versions_are_refused(
    tmp_path: Path, overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        read_checkpoint_config(_folder(tmp_path, **overrides))
    assert "config.json" in str(info.value)


def test_a_config_that_is_no_object_is_one_clear_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="malformed"):
        read_checkpoint_config(folder)
