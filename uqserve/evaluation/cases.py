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

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from uqserve.evaluation.sets import (
    EvalImage,
    FolderSource,
    SetSpec,
    _shift_seed,
)

__all__ = ["CaseFolderSource"]


@dataclass
class CaseFolderSource(FolderSource):
    """Whole annotated volumes of a folder (the format ``uqserve train`` reads).

    ``val_every``: every k-th case is validation (default 2: folders of
    validation scans are small). ``n_ood``: at most this many ID test cases
    are shifted per OOD set.
    """

    val_every: int = 2
    _unit_name = "case"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.description["unit"] = "volume"

    def _units(self) -> int:
        return len(self._dataset)

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
