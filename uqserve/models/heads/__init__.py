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

Modules: ``base`` (``SegNetwork``, the noise sources), ``softmax``, ``ssn``,
``punet``, ``diffusion`` (both diffusion models and ``ddim_sample``, the one
DDIM sampler they share).
"""

from __future__ import annotations

from uqserve.models.heads.base import HashNoise, NoiseSource, RandomNoise, SegNetwork, class_softmax
from uqserve.models.heads.diffusion import (
    DIFFUSION_MAX_PERIOD,
    DiffusionHeadNet,
    DiffusionNet,
    ddim_sample,
    diffusion_gamma,
    stratified_times,
    time_embedding,
)
from uqserve.models.heads.punet import PUNetNet
from uqserve.models.heads.softmax import SoftmaxNet
from uqserve.models.heads.ssn import SSNNet

__all__ = [
    "DIFFUSION_MAX_PERIOD",
    "DiffusionHeadNet",
    "DiffusionNet",
    "HashNoise",
    "NoiseSource",
    "PUNetNet",
    "RandomNoise",
    "SSNNet",
    "SegNetwork",
    "SoftmaxNet",
    "class_softmax",
    "ddim_sample",
    "diffusion_gamma",
    "stratified_times",
    "time_embedding",
]
