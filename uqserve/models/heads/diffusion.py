"""Diffusion segmentation, as the paper and a cheap head variant, with one DDIM sampler."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from uqserve.models import noise as hash_noise
from uqserve.models.config import ModelConfig
from uqserve.models.dropout import FreshMasks, dropout_layers
from uqserve.models.heads.base import (
    HashNoise,
    NoiseSource,
    SegNetwork,
    class_softmax,
)
from uqserve.models.unet import ResBlock, TimeUNet

#: The paper's sinusoidal time embedding of t in [0, 1]: max period 10.
DIFFUSION_MAX_PERIOD = 10.0


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The paper's embedding ``[N, dim]`` (cos, then sin) of diffusion times ``t`` ``[N]``
    in [0, 1], used as is (no x1000): frequencies ``10 ** (-i / (dim / 2))``."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    args = t.reshape(-1, 1) * torch.exp(-math.log(DIFFUSION_MAX_PERIOD) * steps / half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal), clipped away from 0 and 1 (the head variant)."""
    s = 0.008
    return (torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2).clamp(1e-4, 0.9999)


def ddim_sample(
    x: torch.Tensor,
    steps: int,
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    to_x0: Callable[[torch.Tensor], torch.Tensor] | None,
    signal: Callable[[int], torch.Tensor | float],
) -> torch.Tensor:
    """The one DDIM sampler (deterministic, eta = 0) of both diffusion models.

    From pure noise ``x`` ``[N, K, H, W]`` at step 0 (t = 1) over ``steps``
    steps: ``predict(x, i)`` is the denoiser's output at step ``i``,
    ``to_x0`` turns it into the clean estimate x̂0 (``None``: it is x̂0), and
    ``signal(i)`` is the signal fraction γ at step ``i`` (a float, or a
    tensor for a schedule computed in the graph). Between steps
    ε = (x - √γ_i x̂0) / √(1 - γ_i) and x = √γ_{i+1} x̂0 + √(1 - γ_{i+1}) ε.
    Returns the last step's ``predict`` output. Unrolled when exported.
    """
    out = x
    for i in range(steps):
        out = predict(x, i)
        if i == steps - 1:
            break
        x0 = out if to_x0 is None else to_x0(out)
        g, g_next = signal(i), signal(i + 1)
        eps = (x - _sqrt(g) * x0) / _sqrt(1.0 - g)
        x = _sqrt(g_next) * x0 + _sqrt(1.0 - g_next) * eps
    return out


def _sqrt(v: torch.Tensor | float) -> torch.Tensor | float:
    return torch.sqrt(v) if isinstance(v, torch.Tensor) else math.sqrt(v)


class DiffusionHeadNet(SegNetwork):
    """The cheap variant (``diffusion_denoiser="head"``): a small denoiser head on
    backbone features computed once, ±scale targets, Nichol cosine schedule,
    cross-entropy; not the paper's model (see :class:`DiffusionNet`)."""

    au = "diffusion"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        k, w = config.num_classes, config.width
        self.time_dim = 16
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.inp = nn.Conv2d(w + k, w, 3, padding=1)
        self.block = ResBlock(w, w, config.dropout)  # dropout in the denoiser, as the paper
        self.out = nn.Conv2d(w, k, 1)

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(1000.0) * steps / half)
        args = 1000.0 * t.reshape(-1, 1) * freqs.reshape(1, -1)
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        return self.time_mlp(emb).unsqueeze(-1).unsqueeze(-1)

    def denoise(self, feats: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 logits ``[N,K,H,W]`` from features, noisy mask ``[N,K,H,W]``, time ``[N]``/``[1]``."""
        h = self.inp(torch.cat([feats, x_t], dim=1)) + self._time_embedding(t)
        return self.out(self.block(h))

    def _x0(self, onehot_or_probs: torch.Tensor) -> torch.Tensor:
        return (2.0 * onehot_or_probs - 1.0) * self.config.diffusion_scale

    def sample_probs_from(
        self, context: tuple[torch.Tensor, ...], noise: NoiseSource, samples: int
    ) -> torch.Tensor:
        k, steps = self.config.num_classes, self.config.diffusion_steps
        feats = context[0]
        b, f, h, w = feats.shape
        fr = feats.unsqueeze(1).expand(b, samples, f, h, w).reshape(-1, f, h, w)
        x = noise.pixel_normal(hash_noise.STREAM_DIFFUSION, k).reshape(-1, k, h, w)
        times = [torch.tensor([1.0 - i / steps], dtype=torch.float32) for i in range(steps + 1)]
        logits = ddim_sample(
            x,
            steps,
            lambda x_t, i: self.denoise(fr, x_t, times[i]),
            to_x0=lambda out: self._x0(class_softmax(out, dim=1)),
            signal=lambda i: _alpha_bar(times[i]),
        )
        return class_softmax(logits, dim=1).reshape(b, samples, k, h, w)

    def _loss(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        k = self.config.num_classes
        feats = self.features(image)
        x0 = self._x0(F.one_hot(target, k).permute(0, 3, 1, 2).to(image.dtype))
        t = torch.rand(image.shape[0], device=image.device)
        ab = _alpha_bar(t).view(-1, 1, 1, 1)
        x_t = torch.sqrt(ab) * x0 + torch.sqrt(1.0 - ab) * torch.randn_like(x0)
        loss = F.cross_entropy(self.denoise(feats, x_t, t), target)
        return loss, {"ce": float(loss.detach())}


def diffusion_gamma(t: torch.Tensor, input_scale: float, logsnr: float) -> torch.Tensor:
    """Signal fraction γ(t) = sigmoid(logSNR(t)), float64, as the paper's schedule.

    cos²(πt/2), input-scaled (``b² γ / ((b² - 1) γ + 1)``: SNR x b²), then mapped
    linearly so that logSNR runs from ``logsnr`` at t = 0 to ``-logsnr`` at t = 1.
    """
    t = t.to(torch.float64)
    b2 = float(input_scale) ** 2

    def scaled(tt: torch.Tensor) -> torch.Tensor:
        g = torch.cos(tt * (math.pi / 2)) ** 2
        return b2 * g / ((b2 - 1.0) * g + 1.0)

    ends = scaled(torch.tensor([0.0, 1.0], dtype=torch.float64))
    hi, lo = 1 / (1 + math.exp(-logsnr)), 1 / (1 + math.exp(logsnr))
    slope = (hi - lo) / (ends[0] - ends[1])
    return scaled(t) * slope + (lo - ends[1] * slope)


def _fresh_masks(net: nn.Module) -> FreshMasks | None:
    """The per-forward-pass dropout keys of an MC-dropout member graph, if any."""
    return next((d.keys for d in dropout_layers(net) if d.keys is not None), None)


def stratified_times(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``[n]`` training times in [0, 1): one uniform draw in each of n equal strata, shuffled."""
    return (torch.randperm(n, device=device) + torch.rand(n, device=device)) / n


class DiffusionNet(SegNetwork):
    """The paper's diffusion model: a time-conditioned UNet over ``[x_t, image]``."""

    au = "diffusion"
    uses_backbone = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        k, w = config.num_classes, config.width
        self.time_dim = 4 * w
        self.time_mlp = nn.Sequential(
            nn.Linear(w, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, self.time_dim)
        )
        self.denoiser = TimeUNet(
            k + config.in_channels,
            k,
            w,
            config.depth,
            self.time_dim,
            config.dropout,
            config.dropout_positions,
        )

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """No separate backbone: the denoiser sees the image at every step."""
        return image

    def _gamma(self, t: float) -> float:
        c = self.config
        return float(diffusion_gamma(torch.tensor(t), c.diffusion_input_scale, c.diffusion_logsnr))

    def denoise(self, image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂ logits ``[N,K,H,W]`` from image ``[N,C,H,W]``, x_t ``[N,K,H,W]``, t ``[N]``/``[1]``."""
        emb = self.time_mlp(time_embedding(t, self.config.width))
        return self.denoiser(torch.cat([x_t, image], dim=1), emb)

    def sample_probs_from(
        self, context: tuple[torch.Tensor, ...], noise: NoiseSource, samples: int
    ) -> torch.Tensor:
        k, steps = self.config.num_classes, self.config.diffusion_steps
        image = context[0]
        b, c, h, w = image.shape
        rows = image.unsqueeze(1).expand(b, samples, c, h, w).reshape(-1, c, h, w)
        x = noise.pixel_normal(hash_noise.STREAM_DIFFUSION, k).reshape(-1, k, h, w)
        masks = _fresh_masks(self)
        if masks is not None and isinstance(noise, HashNoise):
            masks.rows = noise.sample_index()  # MC dropout: new masks per sample and step
        times = [(steps - i) / steps for i in range(steps + 1)]  # 1, ..., 1/steps, 0

        def predict(x_t: torch.Tensor, i: int) -> torch.Tensor:
            if masks is not None:
                masks.call = i + 1
            t = torch.tensor([times[i]], dtype=torch.float32)
            return class_softmax(self.denoise(rows, x_t, t), dim=1)

        pred = ddim_sample(x, steps, predict, to_x0=None, signal=lambda i: self._gamma(times[i]))
        if masks is not None:
            masks.rows, masks.call = None, 0
        return pred.reshape(b, samples, k, h, w)

    def _loss(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        onehot = F.one_hot(target, c.num_classes).permute(0, 3, 1, 2).to(image.dtype)
        b = image.shape[0]
        t = stratified_times(b, image.device)
        g = diffusion_gamma(t, c.diffusion_input_scale, c.diffusion_logsnr).to(image.dtype)
        g = g.view(-1, 1, 1, 1)
        x_t = torch.sqrt(g) * onehot + torch.sqrt(1.0 - g) * torch.randn_like(onehot)
        pred = class_softmax(self.denoise(image, x_t, t), dim=1)
        loss = F.mse_loss(pred, onehot)
        return loss, {"mse": float(loss.detach())}
