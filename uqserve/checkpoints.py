"""Checkpoint folders of ``uqserve train``: the one writer and the one reader.

A folder holds ``config.json`` (schema in :mod:`uqserve.training`) and the
weight files its ``members`` list names (``member_<m>.safetensors``).
Training writes them with :func:`save_weights` and
:func:`write_checkpoint_config`; :func:`read_checkpoint_config` checks the
config without torch, format version included (a folder of a newer format is
refused, not misread); :func:`load_checkpoints` also builds one network per
weight file. Training (to reload what it wrote) and exporting read them.

Everything is read from ``config.json``: a new combination or a member with
more files needs a new key there, not a second reader.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uqserve._fs import atomic_path, atomic_write_text
from uqserve.errors import UsageError
from uqserve.models.config import ModelConfig, parse_combination

CONFIG_NAME = "config.json"
#: ``config.json``'s ``format`` and ``version``: what this uqserve writes and can read.
FORMAT = "uqserve-checkpoints"
FORMAT_VERSION = 1
SWAG_FILE = "swag.safetensors"
_RETRAIN = "re-run `uqserve train`"


class CheckpointError(UsageError):
    """A checkpoint folder that cannot be read; the message names the file and the fix."""


@dataclass
class Checkpoints:
    """A checkpoint folder read back.

    ``files`` are the weight files in member order; ``networks`` (one per
    file, ``torch.nn.Module`` in ``eval()`` mode on CPU) is empty until
    :func:`load_checkpoints` builds them.
    """

    path: Path
    config: dict[str, Any]
    model_config: ModelConfig
    au: str
    eu: str
    files: list[Path]
    networks: list[Any] = field(default_factory=list)

    @property
    def combination(self) -> str:
        return f"{self.au}-{self.eu}"


def read_checkpoint_config(ckpt_dir: str | os.PathLike[str]) -> Checkpoints:
    """Read and check ``config.json`` and that every weight file exists (no torch)."""
    path = Path(ckpt_dir)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint folder; pass a folder written by `uqserve train`"
        )
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing; pass a folder written by `uqserve train`")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise TypeError(f"a JSON object expected, got {type(cfg).__name__}")
        _check_format(cfg, cfg_path)
        au, eu = parse_combination(str(cfg["combination"]))
        mc = ModelConfig.from_dict(dict(cfg["model_config"]))
        files = [path / str(m["file"]) for m in cfg["members"]]
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc.msg}); {_RETRAIN}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: malformed ({exc}); {_RETRAIN}") from exc
    if not files:
        raise CheckpointError(f"{cfg_path}: lists no members; {_RETRAIN}")
    for f in files:
        # Weight files are read as safetensors (no pickle, no code) and only inside the folder.
        if not f.resolve().is_relative_to(path.resolve()):
            raise CheckpointError(
                f"{cfg_path}: member file {str(f)!r} leads outside {path}; "
                f"weight files must lie inside the checkpoint folder: {_RETRAIN}"
            )
        if not f.is_file():
            raise CheckpointError(
                f"{f}: checkpoint missing ({len(files)} members expected); {_RETRAIN}"
            )
    return Checkpoints(path=path, config=cfg, model_config=mc, au=au, eu=eu, files=files)


def _check_format(cfg: dict[str, Any], cfg_path: Path) -> None:
    """``format`` and ``version`` are this uqserve's; a newer version is refused."""
    if cfg.get("format") != FORMAT:
        raise CheckpointError(
            f"{cfg_path}: not a uqserve checkpoint config (format {cfg.get('format')!r}, "
            f"expected {FORMAT!r}); pass a folder written by `uqserve train`"
        )
    version = cfg.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{cfg_path}: format version {version!r} is not valid; {_RETRAIN}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format version {version} is newer than this uqserve reads "
            f"({FORMAT_VERSION}); upgrade uqserve, or {_RETRAIN} with this one"
        )


def write_checkpoint_config(folder: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Write ``config.json`` (``format``/``version`` set here) into ``folder``, atomically."""
    record = {"format": FORMAT, "version": FORMAT_VERSION, **config}
    return atomic_write_text(Path(folder) / CONFIG_NAME, json.dumps(record, indent=2) + "\n")


def save_weights(net: Any, path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Save ``net``'s weights (a ``torch.nn.Module``) as safetensors at ``path``.

    Through the atomic writer: safetensors itself creates the file 0600.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_checkpoints(ckpt_dir: str | os.PathLike[str], members: int | None = None) -> Checkpoints:
    """Read a checkpoint folder and build its networks (``eval()`` mode, on CPU).

    ``members``: build only the first ``members`` networks (default: all).
    """
    ck = read_checkpoint_config(ckpt_dir)
    if members is not None:
        if not 1 <= members <= len(ck.files):
            raise CheckpointError(
                f"{ck.path}: asked for {members} members but {len(ck.files)} were trained"
            )
        ck.files = ck.files[:members]
    ck.networks = [_load_network(ck.au, ck.model_config, f) for f in ck.files]
    return ck


def _load_network(au: str, config: ModelConfig, file: Path) -> Any:
    from safetensors.torch import load_file

    from uqserve.models import build_network

    net = build_network(au, config)
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"{file}: not a readable safetensors checkpoint ({exc}); {_RETRAIN}"
        ) from exc
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise CheckpointError(
            f"{file}: weights do not fit the model in config.json ({first})"
        ) from exc
    return net.eval()


__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "SWAG_FILE",
    "CheckpointError",
    "Checkpoints",
    "load_checkpoints",
    "read_checkpoint_config",
    "save_weights",
    "write_checkpoint_config",
]
