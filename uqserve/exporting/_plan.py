"""What a bundle is before it is written: the export plan, its manifest, the export error."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uqserve._version import __version__
from uqserve.bundle import InputSpec, Manifest, Member, name_problem
from uqserve.errors import UsageError

#: The ONNX opset uqserve exports member graphs at.
OPSET = 18


class ExportError(UsageError):
    """An export that cannot proceed; the message names the file and the fix."""


def bundle_name(name: str | None, out_dir: str | os.PathLike[str]) -> str:
    """``name``, or the output folder's name; refused unless a valid bundle name."""
    chosen = name or Path(out_dir).name
    if problem := name_problem(chosen):
        raise ExportError(problem if name else f"{problem}, or pass one (the default is --out's)")
    return chosen


def refuse_repeated_members(members: Sequence[tuple[str, str]]) -> None:
    """Refuse two members with the same weights; ``members`` are ``(label, weight sha256)``.

    Copies of one network make an "ensemble" whose members always agree: EU
    is 0 everywhere and the OOD flag can never fire.
    """
    seen: dict[str, str] = {}
    for label, digest in members:
        if digest in seen:
            raise ExportError(
                f"{label} has the same weights as {seen[digest]} (sha256 {digest[:12]}…); "
                "ensemble members must differ (copies give EU = 0, so the OOD flag never "
                "fires): pass each member once"
            )
        seen[digest] = label


@dataclass
class ExportPlan:
    """What one bundle is: combination, members, samples, classes, preprocessing."""

    name: str
    au: str
    eu: str
    num_members: int
    num_samples: int
    classes: tuple[str, ...]
    input: InputSpec
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Refused before anything is trained or written.
        if problem := name_problem(self.name):
            raise ExportError(problem)

    def manifest(self, members: tuple[Member, ...], opset: int) -> Manifest:
        """The (not yet calibrated) manifest of these member files."""
        return Manifest(
            name=self.name,
            au=self.au,
            eu=self.eu,
            num_members=self.num_members,
            num_samples=self.num_samples,
            classes=self.classes,
            members=members,
            input=self.input,
            seed=self.seed,
            opset=opset,
            uqserve_version=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            extra=self.extra,
        )
