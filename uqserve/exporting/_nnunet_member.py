"""One nnU-Net fold in uqserve's member contract (a torch module, exported to ONNX).

``forward(image [B, C, rows, cols], seed [B], offset [B, 3], valid [B, 2])``
returns ``mean [B, K, rows, cols]``, ``sample_entropy [B, rows, cols]``,
``sample_counts [B, 1, K]`` and ``sample_labels [B, 1, rows, cols]``: a softmax
member draws one sample, so its sample entropy is the entropy of ``mean``.
``seed`` and ``offset`` are unused (no noise).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from uqserve.models.member import summarize

__all__ = ["NnunetMember", "mirror_combinations"]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's flip combinations of the tensor axes ``axes``: every non-empty subset."""
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


class NnunetMember(nn.Module):
    """A fold's network, optionally mirrored, as a uqserve member graph.

    ``mirror_axes``: nnU-Net's spatial mirroring axes (0, 1 for a 2D model; the
    checkpoint's ``inference_allowed_mirroring_axes``); empty: no mirroring.
    """

    def __init__(self, net: nn.Module, mirror_axes: Sequence[int] = ()) -> None:
        super().__init__()
        self.net = net.eval()
        self.flips = mirror_combinations([int(a) + 2 for a in mirror_axes])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's ``_internal_maybe_mirror_and_predict``: logits averaged over flips."""
        out = self.net(x)
        for axes in self.flips:
            out = out + torch.flip(self.net(torch.flip(x, axes)), axes)
        return out / (len(self.flips) + 1) if self.flips else out

    def forward(
        self,
        image: torch.Tensor,
        seed: torch.Tensor,
        offset: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # uqserve's slice rows/cols are NIfTI axis order; nnU-Net's arrays are
        # SimpleITK's (axes reversed): swap them for the network and back.
        logits = self.logits(image.transpose(-1, -2)).transpose(-1, -2)
        probs = torch.softmax(logits.float(), dim=1).unsqueeze(1)  # [B, 1, K, H, W]
        return summarize(probs, valid)
