"""``assemble_checkpoints``: ensemble and SWAG folders from already trained networks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uqserve._fs import replace_dir_atomically
from uqserve.checkpoints import Checkpoints as Checkpoints  # the reader lives there
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.checkpoints import (
    read_checkpoint_config,
    save_weights,
    write_checkpoint_config,
)

if TYPE_CHECKING:
    pass
from uqserve.training.batches import _Slices
from uqserve.training.config import SWAG_FILE, SWAG_METHODS, TrainConfig, TrainError
from uqserve.training.run import _checked_configs, _prepare_out, _swag_entry
from uqserve.training.validation import _validation_set, dice_vs_majority

# ------------------------------------------------------------------ shared networks


def assemble_checkpoints(
    sources: Sequence[str | os.PathLike[str]],
    combination: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Build the checkpoint folder of ``combination`` from trained ``<au>-none`` folders.

    * ``none``: ``sources[0]``'s network;
    * ``ensemble``: member ``m`` is ``sources[m]``'s network (train source ``m`` with
      seed ``s + m``: the folder is then what ``train`` would write for seed ``s``);
    * ``swag`` / ``swagdiag``: ``sources[0]`` trained with ``collect_swag=True``; the
      weights are its SWAG mean, SWAG-D keeps only the diagonal moments.

    MC dropout trains its own network (``train``). Written atomically; returns ``out_dir``.
    """
    au, eu = _checked_configs(combination, None, None)[:2]
    cks = [(load_checkpoints if eu in SWAG_METHODS else read_checkpoint_config)(p) for p in sources]
    bad = [str(c.path) for c in cks if c.combination != f"{au}-none"]
    want = len(cks) >= 1 if eu == "ensemble" else len(cks) == 1
    if eu == "mcdropout" or not want or bad:
        raise TrainError(
            f"{combination}: needs {'one or more' if eu == 'ensemble' else 'one'} trained "
            f"{au}-none folder(s){'; got ' + ', '.join(bad) if bad else ''} (MC dropout: "
            "train it, it has its own network)"
        )
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    with replace_dir_atomically(out) as tmp:
        cfg = dict(cks[0].config)
        if eu in SWAG_METHODS:
            entry, dice = _assemble_swag(cks[0], tmp, eu)
            members, validation = [entry], ([] if dice is None else [dice])
        else:
            members, validation = [], []
            for m, ck in enumerate(cks):
                (tmp / f"member_{m}.safetensors").write_bytes(ck.files[0].read_bytes())
                members.append({**ck.config["members"][0], "file": f"member_{m}.safetensors"})
                validation += ck.config.get("validation", {}).get("dice_vs_majority", [])
        cfg.pop("swag", None)
        cfg.update(
            combination=combination, eu=eu, num_members=len(members), members=members,
            bundle_members={"ensemble": len(members), "none": 1}.get(eu, cfg["train_config"]
                                                                    ["swag_draws"]),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(_swag_entry(TrainConfig.from_dict(cfg["train_config"]), eu)
               if eu in SWAG_METHODS else {}),
        )  # fmt: skip
        if validation:
            cfg["validation"] = {
                **cfg.get("validation", {}),
                "dice_vs_majority": [round(v, 4) for v in validation],
                "dice_vs_majority_mean": round(float(np.mean(validation)), 4),
            }
        write_checkpoint_config(tmp, cfg)
    return out


def _assemble_swag(ck: Checkpoints, tmp: Path, eu: str) -> tuple[dict[str, Any], float | None]:
    """Write ``member_0`` (the SWAG mean) and the SWAG-(D) statistics of ``ck``'s run into
    ``tmp``; returns its member entry and its held-out Dice (None without a held-out set)."""
    from uqserve.models.swag import SwagStats, load_parameters, mean_weights

    file = ck.path / SWAG_FILE
    if not file.is_file():
        raise TrainError(f"{ck.path}: no {SWAG_FILE}; train it with collect_swag=True")
    stats = SwagStats.load(file)
    if eu == "swagdiag":  # SWAG-D: the same moments, no deviation matrix
        stats = SwagStats(stats.mean, stats.sq_mean, {}, stats.snapshots, stats.collected, True)
    stats.save(tmp / SWAG_FILE)
    net = load_parameters(ck.networks[0], mean_weights(stats))
    save_weights(net, tmp / "member_0.safetensors", {"combination": f"{ck.au}-{eu}", "member": "0",
                                             "seed": str(ck.config["seed"])})  # fmt: skip
    entry = {**ck.config["members"][0], "file": "member_0.safetensors"}
    tc = TrainConfig.from_dict(ck.config["train_config"])
    val = _validation_set(
        _Slices([], [], ck.model_config.num_classes, ck.config["data"]), tc, ck.model_config
    )
    norm = ck.config["normalization"]
    dice = None
    if val is not None:
        dice = dice_vs_majority(net, val.images, val.annotations, norm["mean"], norm["std"],
                                ck.model_config.num_classes)  # fmt: skip
        entry["dice_vs_majority"] = round(dice, 4)
    return entry, dice
