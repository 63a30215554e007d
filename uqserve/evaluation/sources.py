"""The data source that ``--data`` names: ``"synthetic"`` or a folder of annotated cases.

Its own module because it chooses between the slice sets of ``sets.py`` and
the whole-volume cases of ``cases.py``, which builds on ``sets.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from uqserve.contracts import PAPER_SHIFTS
from uqserve.evaluation.cases import CaseFolderSource
from uqserve.evaluation.sets import (
    DEFAULT_SEVERITIES,
    DataSource,
    FolderSource,
    SyntheticSource,
    check_shifts,
)

__all__ = ["make_source"]


def make_source(
    data: str | os.PathLike[str],
    *,
    num_classes: int,
    size: Sequence[int] = (128, 128),
    n_test: int = 32,
    n_val: int = 32,
    n_ood: int = 16,
    shifts: Sequence[str] | None = None,
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    seed: int = 0,
    volumes: bool = False,
) -> DataSource:
    """``"synthetic"`` or a folder path -> the data source for evaluate/calibrate.

    ``volumes``: a folder's cases run as whole scans (bundles with geometry,
    ``uqserve.evaluation.cases``), the OOD shifts defaulting to the paper's four.
    """
    if volumes and not shifts:
        shifts = PAPER_SHIFTS
    chosen, sev = check_shifts(shifts, severities)
    if str(data) == "synthetic":
        h, w = (int(v) for v in size)
        return SyntheticSource(
            shifts=chosen,
            severities=sev,
            n_test=n_test,
            n_val=n_val,
            n_ood=n_ood,
            size=(h, w),
            num_classes=num_classes,
            seed=seed,
        )
    folder: type[FolderSource] = FolderSource
    if volumes:
        folder = CaseFolderSource
    return folder(
        shifts=chosen,
        severities=sev,
        path=Path(data),
        num_classes=num_classes,
        n_ood=n_ood,
        seed=seed,
    )
