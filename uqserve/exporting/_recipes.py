"""Export recipes (``export/<combination>.toml``): train with ``uqserve.training``, then export.

A recipe has ``combination``, a ``[model]`` table (``ModelConfig`` fields), a
``[train]`` table (``TrainConfig`` fields) and a ``[bundle]`` table
(``num_members``, ``num_samples``, ``seed``, ``name``, ``classes``, ``tile_size``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from uqserve.bundle import Bundle, name_problem
from uqserve.exporting._checkpoints import export_checkpoints
from uqserve.exporting._plan import ExportError
from uqserve.exporting._writer import Calibrator, Say
from uqserve.models.config import ModelConfig, parse_combination


@dataclass
class Recipe:
    """An export recipe (``export/<combination>.toml``)."""

    combination: str
    model: ModelConfig
    train: dict[str, Any]
    num_members: int
    num_samples: int
    seed: int = 0
    name: str | None = None
    classes: tuple[str, ...] | None = None
    tile_size: tuple[int, int] | None = None


def _tile(v: Any) -> tuple[int, int]:
    t = (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))
    return t


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Parse and validate a recipe TOML file."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such recipe; see export/*.toml for examples")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ExportError(f"{path}: not valid TOML ({exc})") from exc
    try:
        combination = str(d["combination"])
        parse_combination(combination)
        model = ModelConfig.from_dict(dict(d.get("model", {})))
        bundle = dict(d.get("bundle", {}))
        recipe = Recipe(
            combination=combination,
            model=model,
            train=dict(d.get("train", {})),
            num_members=int(bundle.get("num_members", 1)),
            num_samples=int(bundle.get("num_samples", model.num_samples)),
            seed=int(bundle.get("seed", 0)),
            name=bundle.get("name"),
            classes=tuple(bundle["classes"]) if "classes" in bundle else None,
            tile_size=_tile(bundle["tile_size"]) if "tile_size" in bundle else None,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ExportError(f"{path}: {exc}") from exc
    if problem := name_problem(recipe.name or recipe.combination):
        raise ExportError(f"{path}: [bundle] {problem}")
    if recipe.classes is not None and len(recipe.classes) != model.num_classes:
        raise ExportError(
            f"{path}: {len(recipe.classes)} class names but model.num_classes = {model.num_classes}"
        )
    return recipe


def export_recipe(
    recipe_toml: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    work_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    calibrate: Calibrator | None = None,
    overrides: dict[str, Any] | None = None,
    progress: Say | None = None,
) -> Bundle:
    """Train the recipe's members with :func:`uqserve.training.train`, then export them.

    ``overrides`` replace training-config fields (e.g. ``{"steps": 5}`` for a smoke test);
    ``calibrate`` as in :func:`export_checkpoints`.
    """
    from uqserve import training

    recipe = load_recipe(recipe_toml)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass `overwrite=True` to replace it")
    au, eu = parse_combination(recipe.combination)
    model = replace(recipe.model, num_samples=recipe.num_samples if au != "softmax" else 1)
    train_kwargs = {**recipe.train, **(overrides or {})}
    if eu == "ensemble":
        train_kwargs.setdefault("num_members", recipe.num_members)
    elif eu == "mcdropout":
        train_kwargs.setdefault("num_masks", recipe.num_members)
    elif eu in ("swag", "swagdiag"):
        train_kwargs.setdefault("swag_draws", recipe.num_members)
    try:
        tc = training.TrainConfig(**train_kwargs)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{recipe_toml}: [train] {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="uqserve-train-", dir=work_dir) as tdir:
        ckpt = training.train(
            recipe.combination,
            Path(tdir) / "ckpt",
            config=tc,
            model_config=model,
            seed=recipe.seed,
            progress=None if progress is None else _say_members(progress),
        )
        return export_checkpoints(
            ckpt,
            out,
            num_members=recipe.num_members,
            num_samples=recipe.num_samples,
            seed=recipe.seed,
            name=recipe.name or recipe.combination,  # not the folder: users copy bundles around
            classes=recipe.classes,
            tile_size=recipe.tile_size,
            calibrate=calibrate,
            overwrite=overwrite,
            progress=progress,
        )


def _say_members(say: Say) -> Callable[[str, int, int, float], None]:
    """Training progress as one line per trained member."""

    def on_step(task: str, done: int, total: int, loss: float) -> None:
        if done == total:
            say(f"trained {task} ({total} steps, loss {loss:.4f})")

    return on_step
