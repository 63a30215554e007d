"""Users' annotated data: one folder per case, one label map per annotator.

Layout (2D and 3D alike):

```text
DATA/
  case_001/
    image.nii.gz          # [X, Y, Z] scan (or [X, Y]); image.nii or image.png also work
    label_alice.nii.gz    # one integer label map per annotator, same grid as the image
    label_bob.nii.gz      # (label_<annotator>.nii / .png also work)
  case_002/
    ...
```

Labels hold class ids ``0 .. K-1`` (0 = background). A 2D PNG image must be
grayscale; it is read as a ``[X, Y, 1]`` volume (columns, rows) with 1 mm
pixels, the same way a one-slice NIfTI is. Folders and files whose names
start with ``.`` are ignored; any other image-like file in a case folder is an
error, so a misspelt label file is not silently skipped.

``load_folder`` reads and checks everything up front and raises
``FolderError`` (a ``ValueError``) naming the first offending file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve._fs import atomic_path
from uqserve.errors import UsageError
from uqserve.volumes.base import Volume

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png")
_LABEL_RE = re.compile(r"^label_(?P<name>[A-Za-z0-9][A-Za-z0-9_\-]*)\.(nii\.gz|nii|png)$")
_FORMAT = (
    "expected DATA/<case>/image.nii.gz plus DATA/<case>/label_<annotator>.nii.gz "
    "(see `uqserve train --help`)"
)


class FolderError(UsageError):
    """A data folder that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Case:
    """One annotated scan.

    image        ``Volume`` with data ``[X, Y, Z]`` float32 (a 2D image is ``[X, Y, 1]``)
    annotations  ``[A, X, Y, Z]`` uint8 class ids, one map per annotator
    annotators   the annotator names, from ``label_<name>``, sorted
    """

    name: str
    image: Volume
    annotations: npt.NDArray[np.uint8]
    annotators: tuple[str, ...]


class FolderDataset(Sequence[Case]):
    """The checked cases of a data folder, in name order."""

    def __init__(self, path: Path, cases: Sequence[Case], num_classes: int) -> None:
        self.path = path
        self.cases = tuple(cases)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Case:  # type: ignore[override]
        return self.cases[index]

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __repr__(self) -> str:
        return (
            f"FolderDataset({str(self.path)!r}, cases={len(self)}, num_classes={self.num_classes})"
        )

    def slices(
        self,
    ) -> tuple[list[npt.NDArray[np.float32]], list[npt.NDArray[np.uint8]]]:
        """All slices along the last (through-plane) axis.

        Returns ``(images, annotations)``: lists of ``[1, X, Y]`` float32 and
        ``[A, X, Y]`` uint8 (``A`` may differ between cases). Slice ``z`` of a
        volume is ``data[:, :, z]``, used as an ``[H, W] = [X, Y]`` image.
        """
        images, annotations = [], []
        for case in self.cases:
            for z in range(case.image.data.shape[2]):
                images.append(np.ascontiguousarray(case.image.data[None, :, :, z]))
                annotations.append(np.ascontiguousarray(case.annotations[:, :, :, z]))
        return images, annotations


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read(path: Path, what: str) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64], object]:
    """Read an image or label file as an ``[X, Y, Z]`` array, its affine and header."""
    if path.name.endswith(".png"):
        try:
            from PIL import Image
        except ImportError as exc:  # pragma: no cover - Pillow is a core dependency
            raise FolderError(f"{path}: reading PNG needs Pillow (pip install pillow)") from exc
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "I", "I;16", "P", "1", "F"):
                    raise FolderError(
                        f"{path}: PNG mode {im.mode} is not grayscale; save the {what} as "
                        "8/16-bit grayscale"
                    )
                arr = np.asarray(im)
        except FolderError:
            raise
        except Exception as exc:
            raise FolderError(f"{path}: cannot read PNG ({exc}); re-save the file") from exc
        # PNG rows/columns -> NIfTI-style [X = columns, Y = rows, Z = 1].
        return arr.T[:, :, None], np.eye(4), None
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise FolderError(f"{path}: cannot read NIfTI ({exc}); re-save the file") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise FolderError(
            f"{path}: the {what} has shape {data.shape}; expected a 2D or 3D scalar image "
            "(split 4D series into one case per volume)"
        )
    return data, affine, img.header


def _check_labels(
    arr: npt.NDArray[np.generic], path: Path, num_classes: int | None
) -> npt.NDArray[np.uint8]:
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise FolderError(
                f"{path}: label map has NaN or infinite values; labels must be integer class ids"
            )
        bad = arr != np.rint(arr)
        if bad.any():
            raise FolderError(
                f"{path}: label map has non-integer values (e.g. {float(arr[bad].flat[0]):g}); "
                "save integer class ids 0..K-1"
            )
    elif arr.dtype.kind not in "iu":
        raise FolderError(f"{path}: label map has dtype {arr.dtype}; save integer class ids 0..K-1")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise FolderError(
            f"{path}: label map has negative class id {lo}; use 0..K-1 (0 = background)"
        )
    if num_classes is not None and hi >= num_classes:
        raise FolderError(
            f"{path}: class id {hi} is beyond num_classes={num_classes} "
            f"(ids must be 0..{num_classes - 1}); fix the labels or raise num_classes"
        )
    if hi > 255:
        raise FolderError(f"{path}: class id {hi} > 255 is not supported")
    return arr.astype(np.uint8)


def _load_case(case_dir: Path, num_classes: int | None) -> Case:
    files = sorted(p for p in case_dir.iterdir() if not p.name.startswith("."))
    images = [
        p for p in files if p.is_file() and _stem(p) == "image" and p.name.endswith(IMAGE_SUFFIXES)
    ]
    labels: dict[str, Path] = {}
    for p in files:
        m = _LABEL_RE.match(p.name)
        if m and p.is_file():
            if m["name"] in labels:
                raise FolderError(
                    f"{p}: annotator {m['name']!r} has two label files "
                    f"({labels[m['name']].name}); keep one"
                )
            labels[m["name"]] = p
        elif p.name.endswith(IMAGE_SUFFIXES) and p not in images:
            raise FolderError(
                f"{p}: unexpected file; name the image image.nii.gz and labels "
                "label_<annotator>.nii.gz, or move it out of the folder"
            )
    if not images:
        raise FolderError(f"{case_dir}: no image.nii.gz (or image.nii / image.png); {_FORMAT}")
    if len(images) > 1:
        raise FolderError(
            f"{case_dir}: several images ({', '.join(p.name for p in images)}); keep one"
        )
    if not labels:
        raise FolderError(
            f"{case_dir}: no label_<annotator>.nii.gz files; "
            "each case needs at least one annotator's label map"
        )
    image_path = images[0]
    raw, affine, header = _read(image_path, "image")
    if raw.dtype.kind not in "biuf":
        raise FolderError(f"{image_path}: image has dtype {raw.dtype}; save a numeric image")
    data = np.asarray(raw, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise FolderError(f"{image_path}: image has NaN or infinite voxels; fix or mask them first")
    names = tuple(sorted(labels))
    maps = []
    for name in names:
        path = labels[name]
        arr, lab_affine, _ = _read(path, "label map")
        if arr.shape != data.shape:
            raise FolderError(
                f"{path}: shape {arr.shape[:2] if arr.shape[2] == 1 else arr.shape} differs from "
                f"{image_path.name} {data.shape[:2] if data.shape[2] == 1 else data.shape}; "
                "labels must be on the image's grid"
            )
        if not np.allclose(lab_affine, affine, atol=1e-3):
            raise FolderError(
                f"{path}: affine differs from {image_path.name}; labels must be on the "
                "image's grid (resample them onto the image)"
            )
        maps.append(_check_labels(arr, path, num_classes))
    volume = Volume(data=data, affine=affine, source=str(image_path), header=header, slice_axis=2)
    return Case(name=case_dir.name, image=volume, annotations=np.stack(maps), annotators=names)


def load_folder(path: str | os.PathLike[str], *, num_classes: int | None = None) -> FolderDataset:
    """Read and check a data folder (see the module docstring for the layout).

    ``num_classes`` (background included) bounds the class ids; by default it
    is the largest id found plus one, at least 2.
    """
    root = Path(path)
    if not root.is_dir():
        raise FolderError(f"{root}: not a folder; {_FORMAT}")
    if num_classes is not None and num_classes < 2:
        raise FolderError(f"num_classes must be >= 2 (background first), got {num_classes}")
    case_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise FolderError(f"{root}: no case folders; {_FORMAT}")
    cases = [_load_case(d, num_classes) for d in case_dirs]
    found = max(int(c.annotations.max()) for c in cases) + 1
    return FolderDataset(root, cases, num_classes if num_classes is not None else max(2, found))


def write_nifti(
    volume: Volume | npt.NDArray[np.generic],
    path: str | os.PathLike[str],
    *,
    affine: npt.NDArray[np.floating] | None = None,
) -> Path:
    """Write a ``Volume`` (or an array with ``affine``) as NIfTI, atomically.

    The sform and qform codes are set to 1 (scanner). Arrays keep their dtype,
    so ``uint8`` label maps stay integer. Returns the path written.
    """
    import nibabel as nib

    path = Path(path)
    if isinstance(volume, Volume):
        data: npt.NDArray[np.generic] = volume.data
        affine = volume.affine if affine is None else affine
    else:
        data = np.asarray(volume)
    if affine is None:
        affine = np.eye(4)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    with atomic_path(path) as tmp:  # keeps the .nii.gz suffix nibabel goes by
        nib.save(img, tmp)
    return path


def write_example_folder(
    path: str | os.PathLike[str],
    num_cases: int = 4,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 16),
    spacing: Sequence[float] = (0.8, 0.8, 3.0),
    ambiguity: str = "low",
    num_classes: int = 2,
    num_annotators: int = 4,
) -> Path:
    """Write synthetic volumes in the folder layout (annotators ``r0, r1, ...``).

    Useful as a template for users' data and in tests. Returns ``path``.
    """
    from uqserve.data.synthetic import make_volume

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_cases):
        sv = make_volume(
            seed + i,
            shape=shape,
            spacing=spacing,
            ambiguity=ambiguity,
            num_classes=num_classes,
            num_annotators=num_annotators,
        )
        case = root / f"case_{i:03d}"
        case.mkdir(exist_ok=True)
        write_nifti(sv.volume, case / "image.nii.gz")
        for a in range(num_annotators):
            write_nifti(sv.annotations[a], case / f"label_r{a}.nii.gz", affine=sv.volume.affine)
    return root
