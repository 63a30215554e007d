"""What every head shares: ``SegNetwork`` (backbone, head, loss), noise sources, softmax."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from uqserve.errors import UsageError
from uqserve.models import noise as hash_noise
from uqserve.models.config import ModelConfig
from uqserve.models.unet import UNet


def class_softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the (short) class axis ``dim``.

    Written out because onnxruntime's Softmax over a non-last axis transposes the
    whole tensor; max/exp/sum/div over K is about twice as fast in the graph.
    """
    e = torch.exp(logits - logits.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


class NoiseSource(Protocol):
    """Where a head's standard-normal noise comes from."""

    def global_normal(self, stream: int, n: int) -> torch.Tensor:
        """``[B, S, n]``: one value per image, sample and index (no position)."""
        ...

    def pixel_normal(self, stream: int, channels: int) -> torch.Tensor:
        """``[B, S, channels, H, W]``: per-pixel noise."""
        ...


class RandomNoise:
    """Training noise from torch's global generator."""

    def __init__(self, batch: int, samples: int, height: int, width: int, device: torch.device):
        self.shape = (batch, samples, height, width)
        self.device = device

    def global_normal(self, stream: int, n: int) -> torch.Tensor:
        b, s, _, _ = self.shape
        return torch.randn(b, s, n, device=self.device)

    def pixel_normal(self, stream: int, channels: int) -> torch.Tensor:
        b, s, h, w = self.shape
        return torch.randn(b, s, channels, h, w, device=self.device)


class HashNoise:
    """Counter-based noise of ``(seed, member, sample, stream, channel, z, y, x)``.

    Per-pixel noise hashes channel pairs: channel ``p < ceil(C/2)`` is the cos
    and channel ``ceil(C/2) + p`` the sin of pair ``p``'s Box-Muller transform.

    ``seed [B]`` int64, ``offset [B, 3]`` int64 ``(z, y0, x0)``; the member index is
    a 0-d int64 tensor (the member graph's buffer) or an int; ``first_sample`` is an int,
    the index of the first of these ``samples`` samples.
    """

    def __init__(
        self,
        seed: torch.Tensor,
        offset: torch.Tensor,
        member: int | torch.Tensor,
        samples: int,
        height: int,
        width: int,
        first_sample: int = 0,
    ) -> None:
        self.seed = seed
        self.offset = offset
        # A 0-d int64 tensor (an exported graph's MEMBER_KEY initializer) or an int.
        self.member = member if isinstance(member, torch.Tensor) else int(member)
        self.samples = samples
        self.first_sample = int(first_sample)
        self.height = height
        self.width = width

    def sample_index(self) -> torch.Tensor:
        """Samples ``first_sample .. first_sample + samples - 1`` (a chunk of all S)."""
        return torch.arange(self.first_sample, self.first_sample + self.samples, dtype=torch.int64)

    def global_normal(self, stream: int, n: int) -> torch.Tensor:
        s = self.sample_index().view(1, -1, 1)
        i = torch.arange(n, dtype=torch.int64).view(1, 1, -1)
        return hash_noise.normal([self.seed.view(-1, 1, 1), self.member, s, stream, i])

    def pixel_normal(self, stream: int, channels: int) -> torch.Tensor:
        # One hash per pair of channels: Box-Muller's cos gives channel p, its sin
        # channel pairs + p (the hash dominates the cost of a sampled head).
        pairs = (channels + 1) // 2
        s = self.sample_index().view(1, -1, 1, 1, 1)
        c = torch.arange(pairs, dtype=torch.int64).view(1, 1, -1, 1, 1)
        z = self.offset[:, 0].view(-1, 1, 1, 1, 1)
        y = self.offset[:, 1].view(-1, 1, 1, 1, 1) + torch.arange(
            self.height, dtype=torch.int64
        ).view(1, 1, 1, -1, 1)
        x = self.offset[:, 2].view(-1, 1, 1, 1, 1) + torch.arange(
            self.width, dtype=torch.int64
        ).view(1, 1, 1, 1, -1)
        z0, z1 = hash_noise.normal_pair(
            [self.seed.view(-1, 1, 1, 1, 1), self.member, s, stream, c, z, y, x]
        )
        both = torch.cat([z0, z1], dim=2)
        return both if 2 * pairs == channels else both[:, :, :channels]


class SegNetwork(nn.Module):
    """Base class: backbone + AU head. Subclasses implement the head and loss."""

    au = "base"
    uses_backbone = True  # False: the subclass is its own network (the UNet denoiser)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.step = 0  # training step, for warm-ups; the trainer may set it
        if self.uses_backbone:
            self.backbone = UNet(
                config.in_channels,
                config.width,
                config.depth,
                config.dropout,
                config.dropout_positions,
                config.dims,
            )

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, C, H, W]`` -> backbone features ``[B, width, H, W]``."""
        return self.backbone(image)

    def head_context(self, image: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What every sample's head needs and no sample changes; default: the features."""
        return (feats,)

    def sample_probs_from(
        self, context: tuple[torch.Tensor, ...], noise: NoiseSource, samples: int
    ) -> torch.Tensor:
        """``[B, S, K, H, W]`` class probabilities of S samples, from ``head_context``."""
        raise NotImplementedError

    def sample_probs(
        self, image: torch.Tensor, feats: torch.Tensor, noise: NoiseSource, samples: int
    ) -> torch.Tensor:
        """``[B, S, K, H, W]`` class probabilities of S samples."""
        return self.sample_probs_from(self.head_context(image, feats), noise, samples)

    def forward(self, image: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        """Eager sampling with torch noise: ``[B, S, K, H, W]`` probabilities."""
        s = samples or self.config.num_samples
        b, (h, w) = image.shape[0], image.shape[-2:]
        noise = RandomNoise(b, s, h, w, image.device)
        return self.sample_probs(image, self.features(image), noise, s)

    def loss(
        self, image: torch.Tensor, target: torch.Tensor, step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training objective for ``image [B,C,H,W]``, ``target [B,H,W]`` int64."""
        _check_batch(image, target, self.config)
        if step is not None:
            self.step = int(step)
        loss, logs = self._loss(image, target)
        if self.training:
            self.step += 1
        return loss, logs

    def _loss(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def _check_batch(image: torch.Tensor, target: torch.Tensor, config: ModelConfig) -> None:
    axes = "H, W" if config.dims == 2 else "D, H, W"
    if image.ndim != 2 + config.dims or image.shape[1] != config.in_channels:
        raise UsageError(
            f"image must be [B, {config.in_channels}, {axes}] float32, got {tuple(image.shape)}"
        )
    if target.shape != (image.shape[0], *image.shape[2:]):
        raise UsageError(
            f"target must be [B, {axes}] = {(image.shape[0], *image.shape[2:])}, "
            f"got {tuple(target.shape)}"
        )
    m = 2 ** (config.depth - 1)
    if any(n % m for n in image.shape[2:]):
        raise UsageError(
            f"{axes} must be multiples of {m} (depth {config.depth}), got {tuple(image.shape[2:])}"
        )
