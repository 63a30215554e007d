"""The one backbone: a residual UNet (2D, or 3D for volumes) with GroupNorm and dropout.

Every AU method uses this backbone (the Probabilistic UNet's prior/posterior
nets reuse its encoder half), so there is one code path to export and test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from uqserve.models.dropout import ChannelDropout


def conv(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """The convolution of ``dims`` spatial axes (2: slices, 3: volumes)."""
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _conv_t(dims: int) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    return nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """norm-act-conv, norm-act-dropout-conv, plus a (1x1 when needed) skip.

    GroupNorm in 2D and 3D: per image, no train/eval difference (see ``dropout``).
    """

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, dims: int = 2) -> None:
        super().__init__()
        c = conv(dims)
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = c(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = ChannelDropout(cout, dropout)
        self.conv2 = c(cout, cout, 3, padding=1)
        self.skip: nn.Module = c(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.drop(self.act(self.norm2(h))))
        return h + self.skip(x)


def channel_widths(width: int, depth: int) -> list[int]:
    """Channels per level: ``width * (1, 2, 4, 8, ...)``."""
    return [width * 2**i for i in range(depth)]


class Encoder(nn.Module):
    """Stem plus ``depth`` levels (one residual block each, stride-2 conv between)."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        depth: int,
        dropout: float = 0.0,
        dropout_positions: Sequence[str] = (),
        dims: int = 2,
    ) -> None:
        super().__init__()
        chans = channel_widths(width, depth)
        self.stem = conv(dims)(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, c in enumerate(chans):
            cin = width if i == 0 else chans[i - 1]
            where = "bottleneck" if i == depth - 1 else "encoder"
            p = dropout if where in dropout_positions else 0.0
            self.blocks.append(ResBlock(cin, c, p, dims))
            if i < depth - 1:
                self.downs.append(conv(dims)(c, c, 3, stride=2, padding=1))
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every level, finest first."""
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return skips


class UNet(nn.Module):
    """Residual UNet; ``forward(image [B,C,H,W]) -> features [B, width, H, W]``.

    ``dims=3``: ``[B,C,D,H,W] -> [B, width, D, H, W]`` (Conv3d, same shape of net).
    Spatial sizes must be multiples of ``2 ** (depth - 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        width: int = 16,
        depth: int = 3,
        dropout: float = 0.0,
        dropout_positions: Sequence[str] = ("encoder", "bottleneck", "decoder"),
        dims: int = 2,
    ) -> None:
        super().__init__()
        chans = channel_widths(width, depth)
        self.encoder = Encoder(in_channels, width, depth, dropout, dropout_positions, dims)
        p_dec = dropout if "decoder" in dropout_positions else 0.0
        self.ups = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth - 1)):
            self.ups.append(_conv_t(dims)(chans[i + 1], chans[i], 2, stride=2))
            self.dec.append(ResBlock(2 * chans[i], chans[i], p_dec, dims))
        self.out_norm = nn.GroupNorm(_groups(width), width)
        self.act = nn.SiLU()
        self.out_channels = width
        self.multiple = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)
        h = skips[-1]
        for up, block, skip in zip(self.ups, self.dec, reversed(skips[:-1]), strict=True):
            h = block(torch.cat([up(h), skip], dim=1))
        return self.act(self.out_norm(h))


class TimeResBlock(nn.Module):
    """:class:`ResBlock` with a time embedding added after the first convolution."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.res = ResBlock(cin, cout, dropout)
        self.time = nn.Linear(emb, cout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.res
        h = r.conv1(r.act(r.norm1(x))) + self.time(emb).unsqueeze(-1).unsqueeze(-1)
        h = r.conv2(r.drop(r.act(r.norm2(h))))
        return h + r.skip(x)


class TimeUNet(nn.Module):
    """The backbone's UNet shape with a time embedding in every block.

    ``forward(x [N, C_in, H, W], emb [N, E]) -> [N, C_out, H, W]``; the
    diffusion denoiser applied to ``[x_t, image]``.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        width: int,
        depth: int,
        emb: int,
        dropout: float = 0.0,
        dropout_positions: Sequence[str] = ("encoder", "bottleneck", "decoder"),
    ) -> None:
        super().__init__()
        chans = channel_widths(width, depth)

        def p(where: str) -> float:
            return dropout if where in dropout_positions else 0.0

        self.stem = nn.Conv2d(cin, width, 3, padding=1)
        self.enc = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, c in enumerate(chans):
            where = "bottleneck" if i == depth - 1 else "encoder"
            self.enc.append(TimeResBlock(width if i == 0 else chans[i - 1], c, emb, p(where)))
            if i < depth - 1:
                self.downs.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.ups = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth - 1)):
            self.ups.append(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2))
            self.dec.append(TimeResBlock(2 * chans[i], chans[i], emb, p("decoder")))
        self.out_norm = nn.GroupNorm(_groups(width), width)
        self.act = nn.SiLU()
        self.out = nn.Conv2d(width, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.enc):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = skips[-1]
        for up, block, skip in zip(self.ups, self.dec, reversed(skips[:-1]), strict=True):
            h = block(torch.cat([up(h), skip], dim=1), emb)
        return self.out(self.act(self.out_norm(h)))
