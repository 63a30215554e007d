"""What to train and how: ``TrainConfig``, its defaults and checks, the device."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from uqserve.checkpoints import FORMAT as FORMAT
from uqserve.checkpoints import FORMAT_VERSION as FORMAT_VERSION
from uqserve.checkpoints import SWAG_FILE as SWAG_FILE
from uqserve.checkpoints import Checkpoints as Checkpoints  # the reader lives there
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.errors import UsageError

if TYPE_CHECKING:
    pass


SWAG_METHODS = ("swag", "swagdiag")
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
