"""MC dropout with per-channel masks that are frozen at export.

During training :class:`ChannelDropout` drops whole channels per image
(``dropout2d``). For an MC-dropout member the masks are drawn once from the
hash noise of ``(seed, member, STREAM_DROPOUT, layer, channel)`` and baked
into the graph as constants, so each dropout "member" is an ordinary
deterministic graph and the masks do not depend on the image size. Only the
dropout layers are touched: GroupNorm has no train/eval difference, and the
network stays in ``eval()`` (calling ``train()`` for MC dropout would also flip
batch statistics in other tools — a silent error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uqserve.models import noise


class ChannelDropout(nn.Module):
    """Channel dropout; ``mask`` (``[C]``, already scaled by ``1/(1-p)``) when frozen."""

    mask: torch.Tensor | None

    def __init__(self, channels: int, p: float) -> None:
        super().__init__()
        self.channels = channels
        self.p = float(p)
        self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            return x * self.mask.view(1, -1, 1, 1)
        if self.training and self.p > 0:
            return F.dropout2d(x, self.p, training=True)
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, p={self.p}, frozen={self.mask is not None}"


def dropout_layers(net: nn.Module) -> list[ChannelDropout]:
    """The network's dropout layers with ``p > 0``, in a fixed (module) order."""
    return [m for m in net.modules() if isinstance(m, ChannelDropout) and m.p > 0]


def freeze_dropout_masks(net: nn.Module, seed: int, member: int) -> int:
    """Freeze every dropout layer's mask from ``(seed, member)``; returns the layer count."""
    layers = dropout_layers(net)
    for i, layer in enumerate(layers):
        c = torch.arange(layer.channels, dtype=torch.int64)
        u = noise.uniform([seed, member, noise.STREAM_DROPOUT, i, c])
        keep = (u >= layer.p).to(torch.float32)
        layer.mask = keep / (1.0 - layer.p)
    return len(layers)


def unfreeze_dropout_masks(net: nn.Module) -> None:
    """Undo :func:`freeze_dropout_masks` (back to training behaviour)."""
    for layer in dropout_layers(net):
        layer.mask = None
