"""MC dropout with per-channel masks from the counter-based noise.

During training :class:`ChannelDropout` drops whole channels per image
(``dropout2d``). An MC-dropout member draws its masks in one of two ways:

- ``fresh`` (the default, as the paper's main grid): every forward pass, i.e.
  every image (slice), gets new masks, computed inside the graph from the hash
  noise of ``(seed, member, STREAM_DROPOUT, layer, channel, z)`` with ``seed``
  the run seed and ``z`` the slice index (a volumetric member keys ``z`` 0: one
  mask set per volume, the same in every window; the diffusion denoiser, called once per
  sample and step, adds the sample index and the step as keys). Tiles of one
  slice share its masks, so results do not depend on tiling or batching, and
  ``--seed`` reproduces them;
- ``frozen``: one mask per member from ``(seed, member, STREAM_DROPOUT, layer,
  channel)``, drawn at export and baked into the graph as constants, so each
  member is an ordinary deterministic graph.

Only the dropout layers are touched: GroupNorm has no train/eval difference,
and the network stays in ``eval()`` (calling ``train()`` for MC dropout would
also flip batch statistics in other tools — a silent error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uqserve.models import noise


class ChannelDropout(nn.Module):
    """Channel dropout.

    ``mask`` (``[C]``, already scaled by ``1/(1-p)``) when frozen; ``keys`` (a
    :class:`FreshMasks`) when masks are drawn per image in the graph.
    """

    mask: torch.Tensor | None
    keys: FreshMasks | None

    def __init__(self, channels: int, p: float) -> None:
        super().__init__()
        self.channels = channels
        self.p = float(p)
        self.mask = None
        self.keys = None
        self.index = 0  # position among the network's dropout layers (a hash key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = [1] * (x.ndim - 2)  # 2 (slices) or 3 (volumes)
        if self.mask is not None:
            return x * self.mask.view(1, -1, *spatial)
        if self.keys is not None:
            # x may hold several rows per image (the diffusion denoiser runs on
            # [B * S] rows, image-major); the masks are [B, 1 or R, C, 1, 1(, 1)].
            m = self.keys.mask(self.index, self.channels, self.p).to(x.dtype)
            m = m.reshape(*m.shape[:3], *spatial)
            rows = x.reshape(m.shape[0], -1, *x.shape[1:]) * m
            return rows.reshape(x.shape)
        if self.training and self.p > 0:
            drop = F.dropout3d if x.ndim == 5 else F.dropout2d
            return drop(x, self.p, training=True)
        return x

    def extra_repr(self) -> str:
        mode = "frozen" if self.mask is not None else ("fresh" if self.keys else "off")
        return f"channels={self.channels}, p={self.p}, masks={mode}"


class FreshMasks:
    """Mask keys of one forward pass: ``seed [B]``, ``z [B]`` int64, the member.

    A network that calls its layers once per row of several rows per image (the
    diffusion denoiser: one row per sample, one call per step) sets ``rows``
    (``[R]`` int64, the sample index of each row) and ``call`` (the step, from 1),
    so every call and row draws new masks, as the paper's denoiser does.
    """

    def __init__(self, member: int) -> None:
        # An int, or the member graph's 0-d int64 buffer (set before each forward pass).
        self.member: int | torch.Tensor = int(member)
        self.seed: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.call = 0

    def mask(self, layer: int, channels: int, p: float) -> torch.Tensor:
        """``[B, 1, C, 1, 1]`` (or ``[B, R, C, 1, 1]`` with ``rows``) keep masks, scaled by
        ``1/(1-p)``."""
        if self.seed is None or self.z is None:
            raise RuntimeError("FreshMasks.mask called before the forward pass set seed and z")
        c = torch.arange(channels, dtype=torch.int64).view(1, 1, -1)
        keys: list[torch.Tensor | int] = [self.seed.view(-1, 1, 1), self.member]
        keys += [noise.STREAM_DROPOUT, layer, c, self.z.view(-1, 1, 1)]
        if self.rows is not None:  # per row and call: two more keys
            keys += [self.rows.view(1, -1, 1), self.call]
        keep = (noise.uniform(keys) >= p).to(torch.float32) / (1.0 - p)
        return keep.unsqueeze(-1).unsqueeze(-1)


def dropout_layers(net: nn.Module) -> list[ChannelDropout]:
    """The network's dropout layers with ``p > 0``, in a fixed (module) order."""
    return [m for m in net.modules() if isinstance(m, ChannelDropout) and m.p > 0]


def fresh_dropout_masks(net: nn.Module, member: int) -> FreshMasks | None:
    """Make every dropout layer draw per-image masks from one :class:`FreshMasks`.

    Returns it (the caller sets its ``seed`` and ``z`` before each forward pass),
    or None when the network has no dropout.
    """
    layers = dropout_layers(net)
    if not layers:
        return None
    keys = FreshMasks(member)
    for i, layer in enumerate(layers):
        layer.index, layer.keys = i, keys
    return keys


def freeze_dropout_masks(net: nn.Module, seed: int, member: int) -> int:
    """Freeze every dropout layer's mask from ``(seed, member)``; returns the layer count."""
    layers = dropout_layers(net)
    for i, layer in enumerate(layers):
        c = torch.arange(layer.channels, dtype=torch.int64)
        u = noise.uniform([seed, member, noise.STREAM_DROPOUT, i, c])
        keep = (u >= layer.p).to(torch.float32)
        layer.mask = keep / (1.0 - layer.p)
    return len(layers)
