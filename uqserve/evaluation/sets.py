"""Evaluation data: the sets every bundle runs over, streamed one image at a time.

A *source* (synthetic data or a user's folder) describes its sets as
``SetSpec`` values and yields ``EvalImage`` values for each; nothing holds a
whole set in memory. The sets:

- ``val``: in-distribution validation images (Platt fits for ACE, thresholds
  of the ``threshold`` aggregator, the OOD threshold in ``calibrate``);
- ``id-low`` / ``id-high`` (synthetic) or ``id`` (folder): the in-distribution
  test set with several annotators, at low and high ambiguity;
- ``ood-<shift>-<severity>``: corrupted copies of in-distribution test images
  (the annotations are kept: the anatomy did not change, the image did).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.volumes import Volume

# The paper's corruptions first, then uqserve's own (all of uqserve.data.SHIFTS).
DEFAULT_SEVERITIES: tuple[float, ...] = (0.5, 1.0)

# Seed bases keep the evaluation images apart from one another and from the
# seeds training draws from (small integers).
_SEED_BASE = {"test": 1_000_000, "val": 2_000_000, "calibration": 3_000_000}


class EvaluationError(UsageError):
    """Input that evaluate/calibrate cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class EvalImage:
    """One 2D image (or one whole volume) with its annotators.

    image        ``[C, H, W]`` float32, raw intensities (the bundle normalises);
                 ``[1, X, Y, Z]`` for a whole volume
    annotations  ``[A, H, W]`` uint8 label maps, one per annotator (``[A, X, Y, Z]``)
    volume       the whole scan, affine included, when the bundle runs on whole
                 volumes (its geometry: spacing, orientation, 3D windows); else None
    """

    image: npt.NDArray[np.float32]
    annotations: npt.NDArray[np.uint8]
    name: str
    index: int
    volume: Volume | None = None


@dataclass(frozen=True)
class SetSpec:
    """One evaluation set: ``kind`` is ``val``, ``id`` or ``ood``."""

    name: str
    kind: str
    ambiguity: str | None = None
    shift: str | None = None
    severity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "ambiguity": self.ambiguity,
            "shift": self.shift,
            "severity": self.severity,
        }


def _shift_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (the same on every machine and run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _shift(
    image: npt.NDArray[np.float32], kind: str, severity: float, seed: int
) -> npt.NDArray[np.float32]:
    from uqserve.data import apply_shift

    return np.asarray(apply_shift(image, kind, severity, seed), dtype=np.float32)


def _all_shifts() -> tuple[str, ...]:
    from uqserve.data import SHIFTS

    return tuple(SHIFTS)


@dataclass
class DataSource:
    """Base: ``sets(split)`` lists the sets, ``images(spec, split)`` streams one."""

    shifts: tuple[str, ...] = ()
    severities: tuple[float, ...] = DEFAULT_SEVERITIES
    description: dict[str, Any] = field(default_factory=dict)

    def sets(self, split: str = "test") -> list[SetSpec]:
        raise NotImplementedError

    def images(self, spec: SetSpec, split: str = "test") -> Iterator[EvalImage]:
        raise NotImplementedError

    def count(self, spec: SetSpec, split: str = "test") -> int:
        raise NotImplementedError

    def _ood_specs(self) -> list[SetSpec]:
        return [
            SetSpec(f"ood-{s}-{sev:g}", "ood", shift=s, severity=float(sev))
            for s in self.shifts
            for sev in self.severities
        ]


@dataclass
class SyntheticSource(DataSource):
    """uqserve's synthetic ambiguous data (``uqserve.data.make_slice``).

    ``split="test"`` gives ``id-low``, ``id-high`` (``n_test`` images each)
    and the OOD sets (``n_ood`` images each: shifted copies of the ID test
    images, alternating low and high ambiguity so that ambiguity alone cannot
    tell ID from OOD). ``split="calibration"`` gives the same structure from
    other seeds (the validation data of ``calibrate``). ``val`` has ``n_val``
    images, alternating low and high ambiguity.
    """

    n_test: int = 32
    n_val: int = 32
    n_ood: int = 16
    size: tuple[int, int] = (128, 128)
    num_classes: int = 2
    num_annotators: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_test", "n_val", "n_ood"):
            if int(getattr(self, name)) < 2:
                raise EvaluationError(f"{name} must be at least 2 (got {getattr(self, name)})")
        if not self.shifts:
            self.shifts = _all_shifts()
        self.description = {
            "source": "synthetic",
            "n_test_per_ambiguity": self.n_test,
            "n_val": self.n_val,
            "n_ood_per_set": self.n_ood,
            "size": list(self.size),
            "num_classes": self.num_classes,
            "num_annotators": self.num_annotators,
            "shifts": list(self.shifts),
            "severities": list(self.severities),
            "seed": self.seed,
        }

    def sets(self, split: str = "test") -> list[SetSpec]:
        specs = [
            SetSpec("id-low", "id", ambiguity="low"),
            SetSpec("id-high", "id", ambiguity="high"),
        ]
        return specs + self._ood_specs()

    def count(self, spec: SetSpec, split: str = "test") -> int:
        if spec.kind == "val":
            return self.n_val
        return self.n_test if spec.kind == "id" else self.n_ood

    def _slice(
        self, seed: int, ambiguity: str
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        from uqserve.data import make_slice

        s = make_slice(
            seed,
            size=self.size,
            ambiguity=ambiguity,
            num_classes=self.num_classes,
            num_annotators=self.num_annotators,
        )
        return np.asarray(s.image, np.float32), np.asarray(s.annotations, np.uint8)

    def images(self, spec: SetSpec, split: str = "test") -> Iterator[EvalImage]:
        base = _SEED_BASE[split] + 10_000 * self.seed
        if spec.kind == "val":
            for i in range(self.n_val):
                amb = "low" if i % 2 == 0 else "high"
                img, ann = self._slice(_SEED_BASE["val"] + 10_000 * self.seed + i, amb)
                yield EvalImage(img, ann, f"val-{i:04d}", i)
        elif spec.kind == "id":
            offset = 0 if spec.ambiguity == "low" else 5_000
            for i in range(self.n_test):
                img, ann = self._slice(base + offset + i, spec.ambiguity or "low")
                yield EvalImage(img, ann, f"{spec.name}-{i:04d}", i)
        else:
            assert spec.shift is not None and spec.severity is not None
            for i in range(self.n_ood):
                # Image i of the ID test sets, alternating ambiguity.
                amb, offset = ("low", 0) if i % 2 == 0 else ("high", 5_000)
                img, ann = self._slice(base + offset + i // 2, amb)
                seed = _shift_seed(split, self.seed, spec.shift, spec.severity, i)
                yield EvalImage(
                    _shift(img, spec.shift, spec.severity, seed), ann, f"{spec.name}-{i:04d}", i
                )


def load_cases(path: Path, num_classes: int) -> Any:
    """The checked cases of a user's folder (``uqserve.data.load_folder``), labels < classes."""
    from uqserve.data import load_folder

    if not path.is_dir():
        raise EvaluationError(
            f'{path}: no such folder; pass `data="synthetic"` or a folder of cases'
        )
    try:
        dataset = load_folder(path)
    except ValueError as exc:  # FolderError: names the file and the fix
        raise EvaluationError(str(exc)) from exc
    for case in dataset:
        top = int(case.annotations.max())
        if top >= num_classes:
            raise EvaluationError(
                f"{case.image.source}: labels go up to class {top} but the bundle has "
                f"{num_classes} classes (0..{num_classes - 1}); evaluate a bundle "
                "trained on these classes, or remap the labels"
            )
    return dataset


@dataclass
class FolderSource(DataSource):
    """A user's folder of annotated cases, read by ``uqserve.data.load_folder``.

    Each slice ``data[:, :, z]`` of each case is one 2D image ``[1, X, Y]``
    with its annotators' label maps (as training reads it). Every
    ``val_every``-th image (0, k, 2k, ...) is validation data; the rest is the
    ID test set ``id``; OOD sets are shifted copies of the first ``n_ood``
    test images.
    """

    path: Path = Path(".")
    num_classes: int = 2
    val_every: int = 4
    n_ood: int = 16
    seed: int = 0
    _dataset: Any = field(default=None, repr=False)
    _num: int = 0

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.shifts:
            self.shifts = _all_shifts()
        self._dataset = load_cases(self.path, self.num_classes)
        self._num = self._units()
        if self._num < 2:
            raise EvaluationError(
                f"{self.path}: {self._num} annotated {self._unit_name}; evaluate needs at least 2 "
                "(one for validation, one for testing)"
            )
        n_val = len(self._val_indices())
        self.description = {
            "source": "folder",
            "path": str(self.path),
            "n_cases": len(self._dataset),
            "n_images": self._num,
            "n_val": n_val,
            "n_test": self._num - n_val,
            "n_ood_per_set": min(self.n_ood, self._num - n_val),
            "val_every": self.val_every,
            "shifts": list(self.shifts),
            "severities": list(self.severities),
            "seed": self.seed,
        }

    _unit_name = "image"

    def _units(self) -> int:
        """How many evaluation images the folder holds (here: 2D slices)."""
        return sum(int(c.image.data.shape[2]) for c in self._dataset)

    def _iter_images(self) -> Iterator[tuple[str, npt.NDArray[np.float32], npt.NDArray[np.uint8]]]:
        for case in self._dataset:
            depth = int(case.image.data.shape[2])
            for z in range(depth):
                name = case.name if depth == 1 else f"{case.name}-z{z:03d}"
                image = np.ascontiguousarray(case.image.data[None, :, :, z], np.float32)
                yield name, image, np.ascontiguousarray(case.annotations[:, :, :, z])

    def _val_indices(self) -> list[int]:
        return [i for i in range(self._num) if i % self.val_every == 0]

    def sets(self, split: str = "test") -> list[SetSpec]:
        return [SetSpec("id", "id"), *self._ood_specs()]

    def count(self, spec: SetSpec, split: str = "test") -> int:
        n_val = len(self._val_indices())
        if spec.kind == "val":
            return n_val
        if spec.kind == "id":
            return self._num - n_val
        return min(self.n_ood, self._num - n_val)

    def images(self, spec: SetSpec, split: str = "test") -> Iterator[EvalImage]:
        val = set(self._val_indices())
        limit = self.count(spec, split)
        j = 0
        for i, (name, image, ann) in enumerate(self._iter_images()):
            if (spec.kind == "val") != (i in val):
                continue
            if j >= limit:
                break
            if spec.kind == "ood":
                assert spec.shift is not None and spec.severity is not None
                seed = _shift_seed("folder", self.seed, spec.shift, spec.severity, i)
                image = _shift(image, spec.shift, spec.severity, seed)
                name = f"{name} [{spec.shift} {spec.severity:g}]"
            yield EvalImage(image, ann, name, j)
            j += 1


def check_shifts(
    shifts: Sequence[str] | None, severities: Sequence[float]
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Checked ``(shifts, severities)``; no shifts means all of ``uqserve.data.SHIFTS``."""
    known = _all_shifts()
    chosen = tuple(shifts) if shifts else known
    bad = [s for s in chosen if s not in known]
    if bad:
        raise EvaluationError(f"unknown shift(s) {', '.join(bad)}; choose from {', '.join(known)}")
    sev = tuple(float(s) for s in severities)
    if not sev or any(not 0.0 <= s <= 1.0 for s in sev):
        raise EvaluationError(f"severities must lie in [0, 1], got {list(sev)}")
    return chosen, sev


def data_options(
    n_test: int,
    n_val: int,
    n_ood: int,
    size: Sequence[int] | None,
    shifts: Sequence[str] | None,
    severities: Sequence[float],
    seed: int,
) -> dict[str, Any]:
    """The options of ``make_source`` as one dict (what evaluate and calibrate pass on)."""
    return {
        "n_test": n_test,
        "n_val": n_val,
        "n_ood": n_ood,
        "size": None if size is None else tuple(int(s) for s in size),
        "shifts": None if shifts is None else tuple(shifts),
        "severities": tuple(severities),
        "seed": seed,
    }
