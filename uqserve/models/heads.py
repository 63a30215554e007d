"""The four AU methods as networks over the shared UNet backbone.

Each network splits into ``features(image)`` (the backbone, computed once),
``head_context(image, features)`` (the head's sample-independent part, e.g.
SSN's mean, factor and diagonal, computed once) and
``sample_probs_from(context, noise, S)`` (the cheap part, batched over S
samples), so an exported member graph runs the backbone once and draws its
samples from the head, a chunk of samples at a time (the paper's diffusion
model has no separate backbone: its UNet denoiser runs at every sampling
step). ``loss(image, target)`` is the training objective.

- softmax: a 1x1 conv to K logits; cross-entropy.
- SSN (Monteiro et al. 2020): logits = mu + F eps_r + sqrt(d) eps_d with a
  rank-r factor F and diagonal d; loss = MC-sampled NLL via logsumexp.
- Probabilistic UNet (Kohl et al. 2018): prior and posterior nets over a
  latent z (dim 6), ``fcomb`` of 1x1 convs; ELBO with KL weight and warm-up.
- diffusion (as the paper): the whole UNet denoises ``[x_t, image]`` with a
  time embedding in every block; x-prediction through a softmax, MSE against
  the one-hot mask; cos² schedule with input scale 0.1, logSNR clamped to
  [-10, 10], stratified t; deterministic DDIM steps unrolled in the graph.
  ``diffusion_denoiser="head"`` selects a cheap head on backbone features.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from uqserve.errors import UsageError
from uqserve.models import noise as hash_noise
from uqserve.models.config import ModelConfig
from uqserve.models.dropout import FreshMasks, dropout_layers
from uqserve.models.unet import Encoder, ResBlock, TimeUNet, UNet, conv

#: The paper's sinusoidal time embedding of t in [0, 1]: max period 10.
DIFFUSION_MAX_PERIOD = 10.0


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The paper's embedding ``[N, dim]`` (cos, then sin) of diffusion times ``t`` ``[N]``
    in [0, 1], used as is (no x1000): frequencies ``10 ** (-i / (dim / 2))``."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    args = t.reshape(-1, 1) * torch.exp(-math.log(DIFFUSION_MAX_PERIOD) * steps / half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


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


def _alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal), clipped away from 0 and 1 (the head variant)."""
    s = 0.008
    return (torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2).clamp(1e-4, 0.9999)


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
        times = [1.0 - i / steps for i in range(steps + 1)]
        logits = x
        for i in range(steps):
            t = torch.tensor([times[i]], dtype=torch.float32)
            t_next = torch.tensor([times[i + 1]], dtype=torch.float32)
            logits = self.denoise(fr, x, t)
            if i == steps - 1:
                break
            x0 = self._x0(class_softmax(logits, dim=1))
            ab, ab_next = _alpha_bar(t), _alpha_bar(t_next)
            eps = (x - torch.sqrt(ab) * x0) / torch.sqrt(1.0 - ab)
            x = torch.sqrt(ab_next) * x0 + torch.sqrt(1.0 - ab_next) * eps
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
        pred = x
        masks = _fresh_masks(self)
        if masks is not None and isinstance(noise, HashNoise):
            masks.rows = noise.sample_index()  # MC dropout: new masks per sample and step
        for i in reversed(range(steps)):  # DDIM from t = 1 to t = 1/steps
            g = self._gamma((i + 1) / steps)
            t = torch.tensor([(i + 1) / steps], dtype=torch.float32)
            if masks is not None:
                masks.call = steps - i
            pred = class_softmax(self.denoise(rows, x, t), dim=1)
            if i == 0:
                break
            eps = (x - math.sqrt(g) * pred) / math.sqrt(1.0 - g)
            g_next = self._gamma(i / steps)
            x = math.sqrt(g_next) * pred + math.sqrt(1.0 - g_next) * eps
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
