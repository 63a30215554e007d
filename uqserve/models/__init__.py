"""The model zoo: one UNet backbone, four AU heads, five EU methods (none, ensemble,
MC dropout, SWAG, SWAG-D).

Importing this package needs no torch; :func:`build_network` and
:func:`member_graph` import it lazily.

>>> from uqserve.models import ModelConfig, build_network
>>> net = build_network("ssn", ModelConfig(num_samples=16))  # doctest: +SKIP
>>> loss, logs = net.loss(image, target)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from uqserve.errors import UsageError
from uqserve.models.config import (
    AU_METHODS,
    COMBINATIONS,
    DEFAULT_SAMPLE_CHUNK,
    EU_METHODS,
    ModelConfig,
    check_dims,
    parse_combination,
)

if TYPE_CHECKING:
    from torch import nn

    from uqserve.models.heads import SegNetwork
    from uqserve.models.member import MemberGraph

__all__ = [
    "AU_METHODS",
    "COMBINATIONS",
    "DEFAULT_SAMPLE_CHUNK",
    "EU_METHODS",
    "ModelConfig",
    "build_network",
    "check_dims",
    "member_graph",
    "parse_combination",
]


# One small builder per architecture (torchvision style); the config is data.
def _softmax(config: ModelConfig) -> SegNetwork:
    from uqserve.models.heads import SoftmaxNet

    return SoftmaxNet(config)


def _ssn(config: ModelConfig) -> SegNetwork:
    from uqserve.models.heads import SSNNet

    return SSNNet(config)


def _punet(config: ModelConfig) -> SegNetwork:
    from uqserve.models.heads import PUNetNet

    return PUNetNet(config)


def _diffusion(config: ModelConfig) -> SegNetwork:
    from uqserve.models.heads import DiffusionHeadNet, DiffusionNet

    return DiffusionNet(config) if config.diffusion_denoiser == "unet" else DiffusionHeadNet(config)


_BUILDERS: dict[str, Callable[[ModelConfig], SegNetwork]] = {
    "softmax": _softmax,
    "ssn": _ssn,
    "punet": _punet,
    "diffusion": _diffusion,
}


def build_network(au: str, config: ModelConfig | None = None) -> SegNetwork:
    """One member network for AU method ``au`` (or a combination name like ``ssn-ensemble``).

    The network has ``loss(image [B,C,H,W], target [B,H,W] int64) -> (loss, logs)``
    and ``forward(image) -> probs [B, S, K, H, W]`` (``config.dims=3``: a ``D``
    axis before ``H``; softmax only, see ``check_dims``).
    """
    if au in COMBINATIONS:
        au = parse_combination(au)[0]
    if au not in _BUILDERS:
        raise UsageError(f"unknown AU method {au!r}; choose one of: {', '.join(AU_METHODS)}")
    config = config or ModelConfig()
    check_dims(au, None, config.dims)
    return _BUILDERS[au](config)


def member_graph(
    net: nn.Module,
    member: int,
    num_samples: int,
    *,
    eu: str = "ensemble",
    seed: int = 0,
    sample_chunk: int = DEFAULT_SAMPLE_CHUNK,
) -> MemberGraph:
    """Wrap a trained network into the exported member contract (see ``docs/architecture.md``).

    For ``eu="mcdropout"`` the dropout masks are drawn per image inside the graph
    (``ModelConfig.mc_dropout_masks = "fresh"``, the default) or frozen from
    ``(seed, member)`` (``"frozen"``); see ``uqserve.models.dropout``.
    ``sample_chunk``: samples drawn at once (default 4); the graph's memory is that
    of one chunk, its outputs do not depend on it beyond float rounding.
    """
    from uqserve.models.member import MemberGraph

    return MemberGraph(net, member, num_samples, eu=eu, seed=seed, sample_chunk=sample_chunk)
