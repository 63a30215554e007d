"""One nnU-Net fold as a plain logits graph in uqserve's axis order (a torch module).

``forward(image [B, C, *spatial]) -> logits [B, K, *spatial]``, spatial in
uqserve's order: ``(rows, cols)`` of a slice (NIfTI array axes, increasing) or
``(D, H, W)`` = ``(z, y, x)`` of a volume. nnU-Net reads images with
SimpleITK (array axes = NIfTI axes reversed) and permutes them by
``transpose_forward``; the graph permutes its input into nnU-Net's order,
runs the network (with test-time mirroring when asked: logits averaged over
every flip combination, as nnU-Net's predictor) and permutes the logits back.
The ONNX wrapper (:func:`uqserve.exporting.wrap_onnx_member`) then adds the
softmax and the rest of the member contract.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["NnunetLogits", "mirror_combinations"]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's flip combinations of the tensor axes ``axes``: every non-empty subset."""
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


class NnunetLogits(nn.Module):
    """A fold's network between uqserve's axis order and nnU-Net's.

    ``perm``: nnU-Net's spatial axis ``j`` is uqserve's axis ``perm[j]``.
    ``mirror_axes``: nnU-Net's spatial mirroring axes (the checkpoint's
    ``inference_allowed_mirroring_axes``); empty: no mirroring.
    """

    def __init__(
        self, net: nn.Module, perm: Sequence[int], mirror_axes: Sequence[int] = ()
    ) -> None:
        super().__init__()
        self.net = net.eval()
        self.to_nnunet = [0, 1, *(2 + int(p) for p in perm)]
        self.back = [0, 1, *(2 + int(perm.index(a)) for a in range(len(perm)))]
        self.flips = mirror_combinations([int(a) + 2 for a in mirror_axes])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(*self.to_nnunet)
        out = self.net(x)
        for axes in self.flips:  # nnU-Net's _internal_maybe_mirror_and_predict
            out = out + torch.flip(self.net(torch.flip(x, axes)), axes)
        if self.flips:
            out = out / (len(self.flips) + 1)
        return out.permute(*self.back).float()
