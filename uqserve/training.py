"""Train the members of an AU x EU combination (PyTorch, imported lazily).

``train(combination, out_dir)`` writes a checkpoint folder::

    out_dir/
      config.json             what was trained and how (schema below)
      member_0.safetensors    EMA weights of member 0
      member_1.safetensors    ... one file per independently trained network

* ensemble: ``num_members`` networks, member ``m`` seeded ``seed + m``;
* mcdropout: one network trained with channel dropout (p = 0.2 unless the
  model config sets one); the exporter turns it into ``num_masks`` members
  with frozen masks;
* swag / swagdiag: one network trained exactly like ``none`` (the same
  schedule, as the paper, whose SWAG runs only observe an ordinary run); over
  its last ``swag_snapshots * swag_every`` steps the raw weights are collected
  every ``swag_every`` steps into SWAG statistics (``swag.safetensors``, see
  ``uqserve.models.swag``); ``member_0`` holds their mean. The exporter draws
  ``swag_draws`` weight sets as members;
* none: one network (``collect_swag=True`` also writes the SWAG statistics of
  its run, from which :func:`assemble_checkpoints` makes the swag/swagdiag
  folders without training again).

:func:`assemble_checkpoints` builds a ``none``, ``ensemble``, ``swag`` or
``swagdiag`` folder from trained ``none`` folders, so a study trains each
shared network once: ensemble member ``m`` of seed ``s`` is the ``none``
network of seed ``s + m``, bit for bit, and SWAG and SWAG-D share one run.

Every step draws a batch of random crops; each image's target is the label
map of one randomly chosen annotator, so the network sees the annotators'
disagreement and the AU head can learn it. Optimiser: AdamW with a linear
warm-up then cosine decay, gradient-norm clipping, and an exponential moving
average (EMA) of the weights, which is what is saved. Augmentation: flips,
90-degree rotations and, in normalised units, intensity scale/shift and
Gaussian noise. Images are normalised with the training set's mean and std
(scheme ``fixed``), recorded in ``config.json`` for the bundle manifest.

``config.json`` keys: ``format`` ("uqserve-checkpoints"), ``version``,
``combination``, ``au``, ``eu``, ``num_members`` (weight files),
``bundle_members`` (members the exported bundle will have), ``seed``,
``model_config`` (``ModelConfig.to_dict()``), ``train_config``
(``TrainConfig`` fields), ``normalization`` (``scheme``, ``mean``, ``std``,
``clip``), ``classes``, ``tile_size``, ``spacing``, ``data`` (where the
training data came from), ``members`` (per member: file, seed, seconds,
final loss, a loss curve), ``validation`` (synthetic data only: Dice of each
member against the annotators' majority on held-out slices),
``uqserve_version``, ``created``.

Volumes (``ModelConfig(dims=3)``, softmax with EU none, ensemble or mcdropout):
each step draws random ``TrainConfig.patch`` ``(D, H, W)`` crops from
``num_volumes`` synthetic volumes (``uqserve.data.make_volume``, RAS+, seen as
``[Z, Y, X]``, the model axes of a 3D bundle); ``config.json`` then also holds
``patch``, ``orientation`` ("RAS") and the ``spacing`` ``[D, H, W]`` in mm. There
is no validation Dice for volumes, and folder data trains 2D networks only.

Same seed, same data, same thread count -> bit-identical weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from uqserve._fs import replace_dir_atomically
from uqserve._progress import LossProgressFn
from uqserve._version import __version__
from uqserve.checkpoints import CONFIG_NAME, read_checkpoint_config
from uqserve.checkpoints import Checkpoints as Checkpoints  # the reader lives there
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.contracts import default_class_names
from uqserve.data import (
    FolderDataset,
    SyntheticSet,
    load_folder,
    make_dataset,
    normalization_stats,
)
from uqserve.data.synthetic import make_volume
from uqserve.errors import UsageError
from uqserve.models import ModelConfig, build_network, check_dims, parse_combination

if TYPE_CHECKING:
    from torch import nn

    from uqserve.models.swag import SwagStats

SWAG_FILE = "swag.safetensors"
SWAG_METHODS = ("swag", "swagdiag")
FORMAT = "uqserve-checkpoints"
FORMAT_VERSION = 1
DEFAULT_DROPOUT = 0.2
DEFAULT_WIDTH = 8  # with TrainConfig() a member trains in minutes on 2 CPU cores
SSN_WARMUP_FRACTION = 10 / 320  # the paper: 10 warm-up epochs of (at least) 320


class TrainError(UsageError):
    """Training cannot start: bad combination, data or settings (the message says which)."""


@dataclass
class TrainConfig:
    """How to train (the model's shape lives in ``ModelConfig``).

    The defaults train a width-8 member in a few minutes on 2 CPU cores.
    """

    steps: int = 600
    batch_size: int = 8
    size: tuple[int, int] = (64, 64)  # training crop = the bundle's tile size
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 0.5
    ema_decay: float = 0.99
    num_members: int = 5  # ensemble: independently trained networks
    num_masks: int = 10  # mcdropout: frozen masks (members) made at export
    # swag/swagdiag: K snapshots, one every N steps over the last K*N steps;
    # the exporter draws swag_draws members.
    swag_snapshots: int = 30
    swag_every: int = 10
    swag_draws: int = 10
    dropout: float = DEFAULT_DROPOUT  # mcdropout, when the model config has none
    augment: bool = True
    noise_std: float = 0.1  # max Gaussian-noise augmentation, in normalised units
    # Synthetic data (``data="synthetic"``).
    num_images: int = 256
    image_size: int = 128
    ambiguity: str = "low"
    num_annotators: int = 4
    data_seed: int = 0
    validate: int = 32  # held-out synthetic slices for the Dice check; 0 = skip
    # Volumes (ModelConfig.dims=3): the training crop (D, H, W) = the bundle's
    # patch, and the synthetic volumes, (X, Y, Z) voxels at (X, Y, Z) mm.
    patch: tuple[int, int, int] = (16, 32, 32)
    num_volumes: int = 4
    volume_shape: tuple[int, int, int] = (64, 64, 24)
    volume_spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    # torch threads; default half the CPUs (1 on 2 cores): on a shared machine,
    # oversubscribed cores make every step much slower.
    threads: int | None = None
    # "cpu" (default), "cuda" or "cuda:N": where the networks train.
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        self.size = (int(self.size[0]), int(self.size[1]))
        self.patch = tuple(int(v) for v in self.patch)  # type: ignore[assignment]
        self.volume_shape = tuple(int(v) for v in self.volume_shape)  # type: ignore[assignment]
        self.volume_spacing = tuple(float(v) for v in self.volume_spacing)  # type: ignore[assignment]
        problems = []
        if len(self.patch) != 3 or min(self.patch) < 4:
            problems.append("patch must be three sizes (D, H, W) >= 4")
        if len(self.volume_shape) != 3 or min(self.volume_shape[:2]) < 8 or self.num_volumes < 1:
            problems.append("volume_shape must be (X, Y, Z) with X, Y >= 8; num_volumes >= 1")
        if len(self.volume_spacing) != 3 or min(self.volume_spacing) <= 0:
            problems.append("volume_spacing must be three positive mm values")
        if self.steps < 1:
            problems.append("steps must be >= 1")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if min(self.size) < 8:
            problems.append("size must be at least 8 x 8")
        if not self.lr > 0:
            problems.append("lr must be > 0")
        if self.grad_clip <= 0:
            problems.append("grad_clip must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append("ema_decay must be in [0, 1)")
        if self.num_members < 1 or self.num_masks < 1 or self.swag_draws < 1:
            problems.append("num_members, num_masks and swag_draws must be >= 1")
        if self.swag_snapshots < 2 or self.swag_every < 1:
            problems.append("swag_snapshots must be >= 2 and swag_every >= 1")
        if not 0.0 < self.dropout < 1.0:
            problems.append("dropout must be in (0, 1)")
        if self.num_images < 1 or self.image_size < 8:
            problems.append("num_images must be >= 1 and image_size >= 8")
        if self.ambiguity not in ("low", "high"):
            problems.append("ambiguity must be 'low' or 'high'")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be >= 1")
        if not _valid_device(self.device):
            problems.append(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if problems:
            raise TrainError("TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("size", "patch", "volume_shape", "volume_spacing"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TrainError(
                f"TrainConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)


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


# --------------------------------------------------------------------------- training


def _valid_device(device: str) -> bool:
    head, colon, index = device.partition(":")
    return device == "cpu" or (head == "cuda" and (not colon or index.isdigit()))


def resolve_device(device: str) -> str:
    """``device`` if torch can train there; TrainError saying what to do otherwise."""
    import torch

    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise TrainError(
            f"device {device!r} requested but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "use device='cpu' or install a CUDA build of torch"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise TrainError(
            f"device {device!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) "
            "are visible; use 'cuda:0'"
        )
    return device


def default_threads() -> int:
    """Torch threads used when ``TrainConfig.threads`` is None: half the CPUs, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _train_member(
    au: str,
    model_config: ModelConfig,
    slices: _Slices,
    config: TrainConfig,
    seed: int,
    mean: float,
    std: float,
    on_step: Callable[[int, float], None],
    swag: str | None = None,
) -> tuple[nn.Module, list[float], SwagStats | None]:
    """Train one network; returns it (EMA weights), its per-step losses and (``swag``:
    "swag" or "swagdiag") the SWAG statistics of its raw weights. Collecting does not
    change the run: the same seed gives the same weights with or without it.
    """
    import torch

    from uqserve.models.swag import SwagCollector, snapshot_steps

    torch.manual_seed(seed)  # seeds every CUDA device too
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EA1]))
    dev = torch.device(config.device)
    net = build_network(au, model_config).to(dev)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    collector, snaps = None, set()
    if swag is not None:
        collector = SwagCollector(net, config.swag_snapshots, diag_only=swag == "swagdiag")
        snaps = set(snapshot_steps(config.steps, config.swag_snapshots, config.swag_every))
    losses = []
    draw, crop = (_batch3d, config.patch) if model_config.dims == 3 else (_batch, config.size)
    for step in range(config.steps):
        x, y = draw(slices, rng, config.batch_size, crop, mean, std, config)
        loss, _ = net.loss(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), step=step)
        if not torch.isfinite(loss):
            raise TrainError(
                f"loss became {float(loss.detach())} at step {step}; lower `lr` or check the data"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        # EMA with a short-run warm-up so early weights do not dominate.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
                else:
                    ema[k].copy_(v)
        if collector is not None and step in snaps:
            collector.collect(net)
        losses.append(float(loss.detach()))
        on_step(step, losses[-1])
    net.load_state_dict(ema)
    net = net.cpu()  # checkpoints, validation and export run on the CPU
    return net.eval(), losses, None if collector is None else collector.stats()


def _curve(losses: Sequence[float], points: int = 50) -> list[float]:
    """Mean loss over ``points`` equal blocks of steps (fewer when training was short)."""
    block = max(1, len(losses) // points)
    arr = np.asarray(losses[: len(losses) // block * block]).reshape(-1, block)
    return [round(float(v), 5) for v in arr.mean(axis=1)]


def majority_vote(annotations: npt.NDArray[np.integer], num_classes: int) -> npt.NDArray[np.uint8]:
    """Per-voxel majority label of ``annotations [A, ...]``; ties go to the lower class id."""
    counts = np.stack([(annotations == k).sum(axis=0) for k in range(num_classes)])
    return np.argmax(counts, axis=0).astype(np.uint8)


def dice_vs_majority(
    net: nn.Module,
    images: npt.NDArray[np.float32],
    annotations: npt.NDArray[np.uint8],
    mean: float,
    std: float,
    num_classes: int,
    batch: int = 16,
) -> float:
    """Foreground Dice (pooled over images, averaged over classes) of ``net``'s argmax.

    ``images [N, 1, H, W]`` raw, ``annotations [N, A, H, W]``; the reference is the
    annotators' majority vote. The prediction is the argmax of the mean over samples.
    """
    import torch

    torch.manual_seed(0)
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(((images[i : i + batch] - mean) / std).astype(np.float32))
            probs = net(x)  # [B, S, K, H, W]
            preds.append(probs.mean(dim=1).argmax(dim=1).numpy())
    pred = np.concatenate(preds)
    ref = np.stack([majority_vote(a, num_classes) for a in annotations])
    scores = []
    for k in range(1, num_classes):
        p, r = pred == k, ref == k
        denom = int(p.sum() + r.sum())
        if denom:
            scores.append(2.0 * float((p & r).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise TrainError(f"{out_dir}: exists and is not a folder; choose another `out_dir`")
        if any(out_dir.iterdir()) and not overwrite:
            raise TrainError(f"{out_dir}: folder is not empty; pass `overwrite=True` to replace it")
    if not out_dir.parent.exists():
        raise TrainError(f"{out_dir.parent}: no such folder; create it first")


def _save(net: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


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
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
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


def _validation_set(
    slices: _Slices, config: TrainConfig, model_config: ModelConfig
) -> SyntheticSet | None:
    """Held-out synthetic slices for each member's Dice (synthetic training data only)."""
    if (
        slices.description["source"] != "synthetic"
        or config.validate <= 0
        or model_config.dims == 3
    ):
        return None
    return make_dataset(
        config.validate,
        config.data_seed + 1_000_003,  # held out: never the training seeds
        size=config.image_size,
        ambiguity=config.ambiguity,
        num_classes=model_config.num_classes,
        num_annotators=config.num_annotators,
    )


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
    _save(net, tmp / fname, {"combination": combination, "member": str(member), "seed": str(seed)})
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
        "format": FORMAT,
        "version": FORMAT_VERSION,
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


def _member_progress(
    progress: LossProgressFn | None, task: str, steps: int
) -> Callable[[int, float], None]:
    """``on_step(step, loss)`` for one member: reports every 5th step and the last."""
    if progress is None:
        return lambda step, loss: None

    def on_step(step: int, loss: float) -> None:
        if step % 5 == 0 or step == steps - 1:
            progress(task, step + 1, steps, loss)

    return on_step


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
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
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
    _save(net, tmp / "member_0.safetensors", {"combination": f"{ck.au}-{eu}", "member": "0",
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
