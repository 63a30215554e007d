"""A user's folder of annotated scans, evaluated one whole volume at a time.

Bundles with geometry (a target ``input.spacing``, an orientation, 3D
windows: nnU-Net exports, ``--dims 3`` bundles) must see whole scans with
their affine, as ``uqserve predict`` does: slices cut out as 1 mm 2D images
would be inputs they were never meant for. ``CaseFolderSource`` yields each
case as one ``EvalImage`` whose ``volume`` the runner sends through
``uqserve.prediction.predict_volume`` (reorientation, resampling, windows),
with the predicted maps back on the scan's grid next to its label maps.

Sets, in cases rather than slices: every ``val_every``-th case (0, k, 2k, ...)
is validation data (the OOD threshold is a quantile of its image-level EU);
the other cases are the ID test set ``id``; a user's folder holds no OOD
scans, so the OOD sets are the ID test cases under the given shifts (by
default the paper's four) at the given severities, applied to the whole
volume (``uqserve.data.apply_shift``), the labels kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uqserve.contracts import PAPER_SHIFTS
from uqserve.evaluation.sets import (
    DataSource,
    EvalImage,
    EvaluationError,
    SetSpec,
    _shift_seed,
    check_shifts,
)

__all__ = ["CaseFolderSource"]


@dataclass
class CaseFolderSource(DataSource):
    """Whole annotated volumes of a folder (the format ``uqserve train`` reads).

    ``val_every``: every k-th case is validation (default 2: folders of
    validation scans are small). ``n_ood``: at most this many ID test cases
    are shifted per OOD set.
    """

    path: Path = Path(".")
    num_classes: int = 2
    val_every: int = 2
    n_ood: int = 16
    seed: int = 0
    _dataset: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from uqserve.data import load_folder

        self.path = Path(self.path)
        if not self.path.is_dir():
            raise EvaluationError(
                f'{self.path}: no such folder; pass `data="synthetic"` or a folder of cases'
            )
        if not self.shifts:
            self.shifts = PAPER_SHIFTS
        try:
            self._dataset = load_folder(self.path)
        except ValueError as exc:  # FolderError: names the file and the fix
            raise EvaluationError(str(exc)) from exc
        for case in self._dataset:
            top = int(case.annotations.max())
            if top >= self.num_classes:
                raise EvaluationError(
                    f"{case.image.source}: labels go up to class {top} but the bundle has "
                    f"{self.num_classes} classes (0..{self.num_classes - 1}); use a bundle "
                    "trained on these classes, or remap the labels"
                )
        n = len(self._dataset)
        if n < 2:
            raise EvaluationError(
                f"{self.path}: {n} annotated case; calibrating a bundle with geometry on "
                "whole volumes needs at least 2 (one for validation, one for testing)"
            )
        n_val = len(self._val_indices())
        self.description = {
            "source": "folder",
            "unit": "volume",
            "path": str(self.path),
            "n_cases": n,
            "n_images": n,
            "n_val": n_val,
            "n_test": n - n_val,
            "n_ood_per_set": min(self.n_ood, n - n_val),
            "val_every": self.val_every,
            "shifts": list(self.shifts),
            "severities": list(self.severities),
            "seed": self.seed,
        }

    def _val_indices(self) -> list[int]:
        return [i for i in range(len(self._dataset)) if i % self.val_every == 0]

    def sets(self, split: str = "test") -> list[SetSpec]:
        return [SetSpec("id", "id"), *self._ood_specs()]

    def count(self, spec: SetSpec, split: str = "test") -> int:
        n, n_val = len(self._dataset), len(self._val_indices())
        if spec.kind == "val":
            return n_val
        if spec.kind == "id":
            return n - n_val
        return min(self.n_ood, n - n_val)

    def images(self, spec: SetSpec, split: str = "test") -> Iterator[EvalImage]:
        from uqserve.data import apply_shift

        val = set(self._val_indices())
        limit = self.count(spec, split)
        cases = [(i, c) for i, c in enumerate(self._dataset) if (spec.kind == "val") == (i in val)]
        for j, (i, case) in enumerate(cases[:limit]):
            vol, name = case.image, case.name
            if spec.kind == "ood":
                assert spec.shift is not None and spec.severity is not None
                seed = _shift_seed("cases", self.seed, spec.shift, spec.severity, i)
                vol = apply_shift(vol, spec.shift, spec.severity, seed)
                name = f"{name} [{spec.shift} {spec.severity:g}]"
            image = np.asarray(vol.data, np.float32)[None]
            yield EvalImage(image, case.annotations, name, j, volume=vol)


def case_source(
    data: str,
    *,
    num_classes: int,
    n_ood: int,
    shifts: Sequence[str] | None,
    severities: Sequence[float],
    seed: int,
) -> CaseFolderSource:
    """The whole-volume source of a folder (``shifts`` default: the paper's four)."""
    chosen, sev = check_shifts(tuple(shifts) if shifts else PAPER_SHIFTS, severities)
    return CaseFolderSource(
        shifts=chosen,
        severities=sev,
        path=Path(data),
        num_classes=num_classes,
        n_ood=n_ood,
        seed=seed,
    )
