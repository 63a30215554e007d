"""``train``: every member of a combination trained and saved into a checkpoint folder."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uqserve._fs import replace_dir_atomically
from uqserve._progress import LossProgressFn
from uqserve._version import __version__
from uqserve.checkpoints import Checkpoints as Checkpoints  # the reader lives there
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.checkpoints import save_weights, write_checkpoint_config
from uqserve.contracts import default_class_names
from uqserve.data import (
    FolderDataset,
    SyntheticSet,
    normalization_stats,
)
from uqserve.models import ModelConfig, check_dims, parse_combination

if TYPE_CHECKING:
    from torch import nn

from uqserve.training.batches import _Slices, _slices
from uqserve.training.config import (
    DEFAULT_WIDTH,
    SSN_WARMUP_FRACTION,
    SWAG_FILE,
    SWAG_METHODS,
    TrainConfig,
    TrainError,
    default_threads,
    resolve_device,
)
from uqserve.training.loop import _curve, _member_progress, _train_member
from uqserve.training.validation import _validation_set, dice_vs_majority


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise TrainError(f"{out_dir}: exists and is not a folder; choose another `out_dir`")
        if any(out_dir.iterdir()) and not overwrite:
            raise TrainError(f"{out_dir}: folder is not empty; pass `overwrite=True` to replace it")
    if not out_dir.parent.exists():
        raise TrainError(f"{out_dir.parent}: no such folder; create it first")


def train(
    combination: str,
    out_dir: str | os.PathLike[str],
    *,
    config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
    data: str | os.PathLike[str] | SyntheticSet | FolderDataset = "synthetic",
    seed: int = 0,
    progress: LossProgressFn | None = None,
    overwrite: bool = False,
    collect_swag: bool = False,
) -> Path:
    """Train the members of ``combination`` (e.g. ``"softmax-ensemble"``) into ``out_dir``.

    ``progress(task, step, steps, loss)`` is called every few steps of each
    member (``task``: ``"<combination> member k/M"``).

    ``data``: ``"synthetic"`` (generated from ``config``), a data folder (see
    ``uqserve.data.load_folder``), or an in-memory ``SyntheticSet``/``FolderDataset``.
    The folder is written atomically: a temp folder beside it is renamed into
    place only when every member is saved. Returns ``out_dir``.

    ``collect_swag`` (``none`` only): also keep the run's SWAG statistics (full
    SWAG, ``swag.safetensors``) for :func:`assemble_checkpoints`; the weights are
    the same as without it.
    """
    au, eu, config, model_config = _checked_configs(combination, config, model_config)
    if collect_swag and eu != "none":
        raise TrainError(f"collect_swag is for EU 'none' (one network), not {combination}")
    swag = eu if eu in SWAG_METHODS else ("swag" if collect_swag else None)
    if collect_swag:
        _checked_configs(f"{au}-swag", config, model_config)  # enough steps for the snapshots
    out = Path(out_dir)
    _prepare_out(out, overwrite)

    slices = _slices(data, config, model_config.num_classes, model_config.dims)
    mean, std = normalization_stats(slices.images)
    num_nets = config.num_members if eu == "ensemble" else 1

    import torch

    resolve_device(config.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads or default_threads())
    try:
        with replace_dir_atomically(out) as tmp:
            members: list[dict[str, Any]] = []
            validation: list[float] = []
            val = _validation_set(slices, config, model_config)
            for k in range(num_nets):
                net, entry = _train_and_save_member(
                    tmp,
                    combination,
                    au,
                    model_config,
                    slices,
                    config,
                    seed + k,
                    (mean, std),
                    _member_progress(
                        progress, f"{combination} member {k + 1}/{num_nets}", config.steps
                    ),
                    swag=swag,
                    member=k,
                    swa_weights=eu in SWAG_METHODS,
                )
                if val is not None:
                    d = dice_vs_majority(
                        net, val.images, val.annotations, mean, std, model_config.num_classes
                    )
                    entry["dice_vs_majority"] = round(d, 4)
                    validation.append(d)
                members.append(entry)
            cfg = _checkpoint_config(
                combination, au, eu, seed, config, model_config, slices, (mean, std), members,
                validation,
            )  # fmt: skip
            if collect_swag:
                cfg.update(_swag_entry(config, "swag"))
            write_checkpoint_config(tmp, cfg)
    finally:
        torch.set_num_threads(threads_before)
    return out


def _checked_configs(
    combination: str, config: TrainConfig | None, model_config: ModelConfig | None
) -> tuple[str, str, TrainConfig, ModelConfig]:
    """``(au, eu, config, model_config)`` with defaults filled in, or a ``TrainError``.

    MC dropout without dropout gets ``config.dropout``; an SSN without a set
    warm-up (``ssn_warmup=None``) warms up for ``SSN_WARMUP_FRACTION`` of the steps;
    the tile size must suit the network depth, and SWAG needs enough steps for its snapshots.
    """
    try:
        au, eu = parse_combination(combination)
        if model_config is not None:
            check_dims(au, eu, model_config.dims)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    config = config or TrainConfig()
    model_config = model_config or ModelConfig(width=DEFAULT_WIDTH)
    if eu == "mcdropout" and model_config.dropout == 0.0:
        model_config = ModelConfig.from_dict({**model_config.to_dict(), "dropout": config.dropout})
    if model_config.ssn_warmup is None:  # the paper's share of the run unless told
        warm = max(1, round(config.steps * SSN_WARMUP_FRACTION)) if au == "ssn" else 0
        model_config = ModelConfig.from_dict({**model_config.to_dict(), "ssn_warmup": warm})
    if model_config.in_channels != 1:
        raise TrainError(
            f"training data has 1 channel but ModelConfig.in_channels={model_config.in_channels}"
        )
    m = model_config.multiple
    if model_config.dims == 3 and any(p % m for p in config.patch):
        raise TrainError(
            f"patch {'x'.join(map(str, config.patch))} must be a multiple of {m} "
            f"(depth {model_config.depth}) along every axis"
        )
    if config.size[0] % m or config.size[1] % m:
        raise TrainError(
            f"size {config.size[0]}x{config.size[1]} must be a multiple of {m} "
            f"(depth {model_config.depth}); use e.g. {m * max(1, round(config.size[0] / m))}"
        )
    if eu in SWAG_METHODS and config.steps < config.swag_snapshots * config.swag_every:
        raise TrainError(
            f"{eu} collects {config.swag_snapshots} snapshots every {config.swag_every} steps: "
            f"steps must be >= {config.swag_snapshots * config.swag_every}, got {config.steps}"
        )
    return au, eu, config, model_config


def _train_and_save_member(
    tmp: Path,
    combination: str,
    au: str,
    model_config: ModelConfig,
    slices: _Slices,
    config: TrainConfig,
    seed: int,
    norm: tuple[float, float],
    progress: Callable[[int, float], None],
    *,
    swag: str | None,
    member: int,
    swa_weights: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train member ``member``, save it (and its SWAG statistics) in ``tmp``; its config entry.

    ``swa_weights``: the saved weights are the SWAG mean of the raw weights, not the EMA.
    """
    from uqserve.models.swag import load_parameters, mean_weights

    t0 = time.perf_counter()
    net, losses, stats = _train_member(
        au, model_config, slices, config, seed, norm[0], norm[1], progress, swag=swag
    )
    if swa_weights and stats is not None:
        net = load_parameters(net, mean_weights(stats))
    seconds = time.perf_counter() - t0
    fname = f"member_{member}.safetensors"
    save_weights(
        net, tmp / fname, {"combination": combination, "member": str(member), "seed": str(seed)}
    )
    if stats is not None:
        stats.save(tmp / SWAG_FILE)
    return net, {
        "file": fname,
        "seed": seed,
        "seconds": round(seconds, 2),
        "final_loss": round(float(np.mean(losses[-max(1, len(losses) // 20) :])), 5),
        "loss_curve": _curve(losses),
    }


def _checkpoint_config(
    combination: str,
    au: str,
    eu: str,
    seed: int,
    config: TrainConfig,
    model_config: ModelConfig,
    slices: _Slices,
    norm: tuple[float, float],
    members: list[dict[str, Any]],
    validation: list[float],
) -> dict[str, Any]:
    """The checkpoint folder's ``CONFIG_NAME`` record (read back by ``uqserve.checkpoints``).

    ``validation``: each member's unrounded Dice on the held-out slices (empty without them).
    """
    num_nets = len(members)
    bundle_members = {
        "ensemble": num_nets,
        "mcdropout": config.num_masks,
        "swag": config.swag_draws,
        "swagdiag": config.swag_draws,
        "none": 1,
    }[eu]
    swag = eu if eu in SWAG_METHODS else None
    return {
        "combination": combination,
        "au": au,
        "eu": eu,
        "num_members": num_nets,
        "bundle_members": bundle_members,
        "seed": seed,
        "model_config": model_config.to_dict(),
        "train_config": config.to_dict(),
        "normalization": {"scheme": "fixed", "mean": norm[0], "std": norm[1], "clip": None},
        "classes": slices.classes or list(default_class_names(model_config.num_classes)),
        "tile_size": list(config.size if model_config.dims == 2 else config.patch[1:]),
        "spacing": list(slices.spacing),
        **(
            {"patch": list(config.patch), "orientation": slices.orientation}
            if model_config.dims == 3
            else {}
        ),
        "data": slices.description,
        "members": members,
        **(_swag_entry(config, swag) if swag else {}),
        "validation": (
            {
                "num_images": config.validate,
                "dice_vs_majority": [round(v, 4) for v in validation],
                "dice_vs_majority_mean": round(float(np.mean(validation)), 4),
            }
            if validation
            else {}
        ),
        "uqserve_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _swag_entry(config: TrainConfig, swag: str) -> dict[str, Any]:
    return {
        "swag": {
            "file": SWAG_FILE,
            "diag_only": swag == "swagdiag",
            "snapshots": config.swag_snapshots,
            "every": config.swag_every,
            "draws": config.swag_draws,
        }
    }
