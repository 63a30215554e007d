"""Training data as slices or volumes, and the random, augmented batches drawn from them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from uqserve.checkpoints import Checkpoints as Checkpoints  # the reader lives there
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.contracts import default_class_names
from uqserve.data import (
    FolderDataset,
    SyntheticSet,
    load_folder,
    make_dataset,
)
from uqserve.data.synthetic import make_volume

if TYPE_CHECKING:
    pass
from uqserve.training.config import TrainConfig, TrainError

# --------------------------------------------------------------------------- data


@dataclass
class _Slices:
    """Training slices: images ``[1, H, W]`` float32 and annotations ``[A, H, W]`` uint8."""

    images: list[npt.NDArray[np.float32]]
    annotations: list[npt.NDArray[np.uint8]]
    num_classes: int
    description: dict[str, Any]
    spacing: tuple[float, ...] = (1.0, 1.0)
    classes: list[str] = field(default_factory=list)
    orientation: str | None = None  # volumes: the axis codes of the (X, Y, Z) data


def _volumes(config: TrainConfig, num_classes: int) -> _Slices:
    """Synthetic volumes as ``[1, Z, Y, X]`` images and ``[A, Z, Y, X]`` annotations.

    ``[Z, Y, X]`` is how a 3D bundle's graphs see a RAS+ scan (``uqserve.prediction``).
    """
    images, annotations = [], []
    for i in range(config.num_volumes):
        v = make_volume(
            config.data_seed * 100_003 + i,
            config.volume_shape,
            config.volume_spacing,
            ambiguity=config.ambiguity,
            num_classes=num_classes,
            num_annotators=config.num_annotators,
        )
        images.append(np.ascontiguousarray(v.volume.data.T[None], dtype=np.float32))
        annotations.append(np.ascontiguousarray(v.annotations.transpose(0, 3, 2, 1)))
    sx, sy, sz = config.volume_spacing
    desc = {"source": "synthetic-volumes", "num_volumes": config.num_volumes}
    desc |= {"volume_shape": list(config.volume_shape), "ambiguity": config.ambiguity}
    return _Slices(
        images=images,
        annotations=annotations,
        num_classes=num_classes,
        description={**desc, "data_seed": config.data_seed},
        spacing=(sz, sy, sx),
        classes=list(default_class_names(num_classes)),
        orientation="RAS",
    )


def _slices(
    data: str | os.PathLike[str] | SyntheticSet | FolderDataset,
    config: TrainConfig,
    num_classes: int,
    dims: int = 2,
) -> _Slices:
    if dims == 3:
        if not (isinstance(data, str) and data == "synthetic"):
            raise TrainError(
                "3D networks (ModelConfig.dims=3) train on synthetic volumes only; "
                "pass data='synthetic' or train a 2D network on the folder"
            )
        return _volumes(config, num_classes)
    if isinstance(data, str) and data == "synthetic":
        data = make_dataset(
            config.num_images,
            config.data_seed,
            size=config.image_size,
            ambiguity=config.ambiguity,
            num_classes=num_classes,
            num_annotators=config.num_annotators,
        )
        desc: dict[str, Any] = {
            "source": "synthetic",
            "num_images": config.num_images,
            "image_size": config.image_size,
            "ambiguity": config.ambiguity,
            "num_annotators": config.num_annotators,
            "data_seed": config.data_seed,
        }
    elif isinstance(data, SyntheticSet):
        desc = {"source": "synthetic-set", "num_images": len(data)}
    elif isinstance(data, FolderDataset):
        desc = {"source": "folder", "path": str(data.path), "cases": len(data)}
    else:
        try:
            data = load_folder(data, num_classes=num_classes)
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
        desc = {"source": "folder", "path": str(data.path), "cases": len(data)}

    if isinstance(data, SyntheticSet):
        if data.num_classes > num_classes:
            raise TrainError(
                f"the synthetic set has {data.num_classes} classes but the model "
                f"{num_classes}; set ModelConfig.num_classes={data.num_classes}"
            )
        return _Slices(
            images=list(data.images),
            annotations=list(data.annotations),
            num_classes=num_classes,
            description=desc,
            classes=list(default_class_names(num_classes)),
        )
    top = max(int(c.annotations.max()) for c in data)
    if top >= num_classes:
        raise TrainError(
            f"{data.path}: labels go up to class {top} but the model has {num_classes} classes; "
            f"pass `num_classes={top + 1}` (ModelConfig.num_classes)"
        )
    images, annotations = data.slices()
    spacing = data[0].image.spacing
    desc["slices"] = len(images)
    return _Slices(
        images=images,
        annotations=annotations,
        num_classes=num_classes,
        description=desc,
        spacing=(float(spacing[0]), float(spacing[1])),
        classes=["background"] + [f"class_{i}" for i in range(1, num_classes)],
    )


def _batch(
    slices: _Slices,
    rng: np.random.Generator,
    batch_size: int,
    size: tuple[int, ...],
    mean: float,
    std: float,
    config: TrainConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """One batch: normalised crops ``[B, 1, h, w]`` and one annotator's labels ``[B, h, w]``."""
    h, w = size
    images = np.empty((batch_size, 1, h, w), np.float32)
    targets = np.empty((batch_size, h, w), np.int64)
    for b in range(batch_size):
        i = int(rng.integers(len(slices.images)))
        img, ann = slices.images[i], slices.annotations[i]
        a = int(rng.integers(ann.shape[0]))  # a random annotator is the target
        ci, cl = _random_crop((img - mean) / std, ann[a], size, rng)
        if config.augment:
            if rng.uniform() < 0.5:
                ci, cl = ci[:, ::-1], cl[::-1]
            if rng.uniform() < 0.5:
                ci, cl = ci[:, :, ::-1], cl[:, ::-1]
            if h == w:
                k = int(rng.integers(4))
                ci, cl = np.rot90(ci, k, axes=(1, 2)), np.rot90(cl, k)
            ci = _jitter(ci, rng, config)
        images[b] = ci
        targets[b] = cl
    return images, targets


def _random_crop(
    img: npt.NDArray[np.floating[Any]],
    lab: npt.NDArray[np.integer[Any]],
    size: tuple[int, ...],
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.integer[Any]]]:
    """A random ``size`` crop of ``img`` ``[1, *sp]`` and ``lab`` ``[*sp]``; an image
    smaller than the crop is padded first (its lowest value, label 0), centred."""
    pad = [(max(0, c - n) // 2, max(0, c - n) - max(0, c - n) // 2)
           for c, n in zip(size, lab.shape, strict=True)]  # fmt: skip
    if any(lo or hi for lo, hi in pad):
        img = np.pad(img, ((0, 0), *pad), constant_values=float(img.min()))
        lab = np.pad(lab, pad, constant_values=0)
    start = [int(rng.integers(n - c + 1)) for n, c in zip(lab.shape, size, strict=True)]
    box = tuple(slice(s0, s0 + c) for s0, c in zip(start, size, strict=True))
    return img[(slice(None), *box)], lab[box]


def _jitter(
    ci: npt.NDArray[np.floating[Any]], rng: np.random.Generator, config: TrainConfig
) -> npt.NDArray[np.floating[Any]]:
    """Intensity augmentation: a random scale and shift, and Gaussian noise."""
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)
    noise = rng.uniform(0.0, config.noise_std)
    return ci * scale + shift + noise * rng.standard_normal(ci.shape)


def _batch3d(
    vols: _Slices,
    rng: np.random.Generator,
    batch_size: int,
    patch: tuple[int, ...],
    mean: float,
    std: float,
    config: TrainConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Random patches ``[B, 1, D, H, W]`` of the volumes and one annotator's ``[B, D, H, W]``.

    Volumes smaller than the patch are padded (lowest value, label 0); augmentation:
    flips along each axis, intensity scale/shift and Gaussian noise (no rotations:
    the axes differ in spacing).
    """
    images = np.empty((batch_size, 1, *patch), np.float32)
    targets = np.empty((batch_size, *patch), np.int64)
    for b in range(batch_size):
        i = int(rng.integers(len(vols.images)))
        img = (vols.images[i] - mean) / std
        lab = vols.annotations[i][int(rng.integers(vols.annotations[i].shape[0]))]
        ci, cl = _random_crop(img, lab, patch, rng)
        if config.augment:
            for axis in range(3):
                if rng.uniform() < 0.5:
                    ci, cl = np.flip(ci, axis + 1), np.flip(cl, axis)
            ci = _jitter(ci, rng, config)
        images[b], targets[b] = ci, cl
    return images, targets
