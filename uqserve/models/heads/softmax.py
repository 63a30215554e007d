"""The deterministic softmax head (S = 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uqserve.models.config import ModelConfig
from uqserve.models.heads.base import (
    NoiseSource,
    SegNetwork,
)
from uqserve.models.unet import conv


class SoftmaxNet(SegNetwork):
    """Deterministic softmax: S = 1."""

    au = "softmax"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.head = conv(config.dims)(config.width, config.num_classes, 1)

    def sample_probs_from(
        self, context: tuple[torch.Tensor, ...], noise: NoiseSource, samples: int
    ) -> torch.Tensor:
        return torch.softmax(self.head(context[0]), dim=1).unsqueeze(1)

    def _loss(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(self.head(self.features(image)), target)
        return loss, {"ce": float(loss.detach())}
