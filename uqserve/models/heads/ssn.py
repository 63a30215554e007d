"""Stochastic segmentation networks (Monteiro et al. 2020): low-rank logit noise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uqserve.models import noise as hash_noise
from uqserve.models.config import ModelConfig
from uqserve.models.heads.base import (
    NoiseSource,
    RandomNoise,
    SegNetwork,
    class_softmax,
)


class SSNNet(SegNetwork):
    """Stochastic segmentation network with a rank-r Gaussian over logits."""

    au = "ssn"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        k, r = config.num_classes, config.ssn_rank
        self.mean_head = nn.Conv2d(config.width, k, 1)
        self.factor_head = nn.Conv2d(config.width, k * r, 1)
        self.diag_head = nn.Conv2d(config.width, k, 1)

    def head_context(self, image: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(mu [B,K,H,W], factor [B,K,r,H,W], sqrt(diag) [B,K,H,W])``."""
        k, r = self.config.num_classes, self.config.ssn_rank
        b, _, h, w = feats.shape
        mu = self.mean_head(feats)
        factor = self.factor_head(feats).reshape(b, k, r, h, w)
        diag = F.softplus(self.diag_head(feats)) + self.config.ssn_eps
        return mu, factor, torch.sqrt(diag)

    def _logits(self, context: tuple[torch.Tensor, ...], noise: NoiseSource) -> torch.Tensor:
        mu, factor, scale = context
        eps_r = noise.global_normal(hash_noise.STREAM_SSN_FACTOR, self.config.ssn_rank)
        eps_d = noise.pixel_normal(hash_noise.STREAM_SSN_DIAG, self.config.num_classes)
        low_rank = torch.einsum("bkrhw,bsr->bskhw", factor, eps_r)
        return mu.unsqueeze(1) + low_rank + scale.unsqueeze(1) * eps_d

    def sample_probs_from(
        self, context: tuple[torch.Tensor, ...], noise: NoiseSource, samples: int
    ) -> torch.Tensor:
        return class_softmax(self._logits(context, noise), dim=2)

    def _loss(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        feats = self.features(image)
        b, _, h, w = image.shape
        s = self.config.ssn_train_samples
        noise = RandomNoise(b, s, h, w, image.device)
        mu, factor, scale = self.head_context(image, feats)
        warm = self.step < (self.config.ssn_warmup or 0)
        if warm:
            # Warm-up as the paper: the low-rank factor is zeroed (no gradient reaches
            # its head) while the diagonal noise and the Monte-Carlo loss stay on.
            factor = torch.zeros_like(factor)
        logits = self._logits((mu, factor, scale), noise)  # [B,S,K,H,W]
        logp = torch.log_softmax(logits, dim=2)
        idx = target.unsqueeze(1).unsqueeze(2).expand(b, s, 1, h, w)
        ll = logp.gather(2, idx).squeeze(2).flatten(2).sum(-1)  # [B, S]
        nll = -(torch.logsumexp(ll, dim=1) - math.log(s)) / (h * w)
        loss = nll.mean()
        if warm:
            return loss, {"nll": float(loss.detach()), "warmup": 1.0}
        return loss, {"nll": float(loss.detach())}
