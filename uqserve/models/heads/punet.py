"""The Probabilistic UNet (Kohl et al. 2018): prior and posterior nets over a latent z."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uqserve.models import noise as hash_noise
from uqserve.models.config import ModelConfig
from uqserve.models.heads.base import (
    NoiseSource,
    SegNetwork,
    class_softmax,
)
from uqserve.models.unet import Encoder


class _LatentNet(nn.Module):
    """Prior / posterior net: encoder, global mean, 1x1 conv to (mu, log sigma)."""

    def __init__(
        self, in_channels: int, width: int, depth: int, latent: int, config: ModelConfig
    ) -> None:
        super().__init__()
        # Dropout as in the backbone (the paper has it in the prior/posterior nets too).
        self.encoder = Encoder(in_channels, width, depth, config.dropout, config.dropout_positions)
        self.out = nn.Conv2d(self.encoder.out_channels, 2 * latent, 1)
        self.latent = latent

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)[-1].mean(dim=(2, 3), keepdim=True)
        out = self.out(h).flatten(1)
        mu, log_sigma = out[:, : self.latent], out[:, self.latent :]
        return mu, log_sigma.clamp(-8.0, 4.0)


class PUNetNet(SegNetwork):
    """Probabilistic UNet: z ~ prior(x), logits = fcomb(features, z)."""

    au = "punet"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        k, lat, w = config.num_classes, config.punet_latent, config.width
        pw = max(4, round(config.width * 0.75 / 4) * 4)
        self.prior = _LatentNet(config.in_channels, pw, config.depth, lat, config)
        self.posterior = _LatentNet(config.in_channels + k, pw, config.depth, lat, config)
        layers: list[nn.Module] = []
        cin = w + lat
        for _ in range(max(1, config.punet_fcomb) - 1):
            layers += [nn.Conv2d(cin, w, 1), nn.SiLU()]
            cin = w
        layers.append(nn.Conv2d(cin, k, 1))
        self.fcomb = nn.Sequential(*layers)

    def _combine(self, feats: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``feats [B,F,H,W]``, ``z [B,S,L]`` -> logits ``[B,S,K,H,W]``."""
        b, f, h, w = feats.shape
        s = z.shape[1]
        fr = feats.unsqueeze(1).expand(b, s, f, h, w).reshape(-1, f, h, w)
        zr = z.reshape(-1, z.shape[2], 1, 1).expand(-1, z.shape[2], h, w)
        logits = self.fcomb(torch.cat([fr, zr], dim=1))
        return logits.reshape(b, s, self.config.num_classes, h, w)

    def head_context(self, image: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu, log_sigma = self.prior(image)  # the prior net runs once, not once per chunk
        return feats, mu, torch.exp(log_sigma)

    def sample_probs_from(
        self, context: tuple[torch.Tensor, ...], noise: NoiseSource, samples: int
    ) -> torch.Tensor:
        feats, mu, sigma = context
        eps = noise.global_normal(hash_noise.STREAM_PUNET_LATENT, self.config.punet_latent)
        z = mu.unsqueeze(1) + sigma.unsqueeze(1) * eps
        return class_softmax(self._combine(feats, z), dim=2)

    def _loss(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        k = self.config.num_classes
        feats = self.features(image)
        onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(image.dtype)
        mu_q, ls_q = self.posterior(torch.cat([image, onehot], dim=1))
        mu_p, ls_p = self.prior(image)
        z = mu_q + torch.exp(ls_q) * torch.randn_like(mu_q)
        logits = self._combine(feats, z.unsqueeze(1))[:, 0]
        ce = F.cross_entropy(logits, target)
        # KL(q || p) of diagonal Gaussians, summed over the latent, mean over the batch.
        var_q, var_p = torch.exp(2 * ls_q), torch.exp(2 * ls_p)
        kl = (ls_p - ls_q + (var_q + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5).sum(1).mean()
        warm = min(1.0, (self.step + 1) / max(1, self.config.punet_warmup))
        loss = ce + self.config.punet_beta * warm * kl
        return loss, {"ce": float(ce.detach()), "kl": float(kl.detach())}
