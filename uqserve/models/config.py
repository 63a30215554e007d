"""Model configuration and the AU x EU combination names (no torch needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# The method names are defined in contracts (the bottom layer) and re-exported here.
from uqserve.contracts import AU_METHODS as AU_METHODS
from uqserve.contracts import COMBINATIONS as COMBINATIONS
from uqserve.contracts import EU_METHODS as EU_METHODS
from uqserve.errors import UsageError

#: Samples a member graph draws at once: [B, 4, K, H, W] tensors keep the head's
#: memory near the backbone's.
DEFAULT_SAMPLE_CHUNK = 4
MC_DROPOUT_MASKS = ("fresh", "frozen")
#: What a volumetric (``dims=3``) member supports: the softmax head only (the
#: sampled heads' noise and the Probabilistic UNet's latent nets are 2D), and the
#: EU methods that need no SWAG statistics.
AU_METHODS_3D = ("softmax",)
EU_METHODS_3D = ("none", "ensemble", "mcdropout")


def check_dims(au: str, eu: str | None, dims: int) -> None:
    """UsageError unless AU ``au`` (with EU ``eu``) can be built with ``dims`` spatial axes."""
    if dims == 3 and (au not in AU_METHODS_3D or (eu or "none") not in EU_METHODS_3D):
        raise UsageError(
            f"{au if eu is None else f'{au}-{eu}'} is not available in 3D (dims=3); 3D supports AU "
            f"{', '.join(AU_METHODS_3D)} with EU {', '.join(EU_METHODS_3D)}"
        )


DIFFUSION_DENOISERS = ("unet", "head")


def parse_combination(name: str) -> tuple[str, str]:
    """``"ssn-ensemble"`` -> ``("ssn", "ensemble")``; ValueError listing valid names."""
    if name not in COMBINATIONS:
        raise UsageError(f"unknown combination {name!r}; choose one of: {', '.join(COMBINATIONS)}")
    au, eu = name.split("-")
    return au, eu


@dataclass
class ModelConfig:
    """Architecture of one member network.

    The defaults are a small CPU-sized model (about 0.15 M parameters); the
    paper's settings are width 32, depth 4, rank 10, latent 6, 10 diffusion steps.
    """

    in_channels: int = 1
    num_classes: int = 2
    dims: int = 2  # spatial axes: 2 (slices [B,C,H,W]) or 3 (volumes [B,C,D,H,W])
    width: int = 16
    depth: int = 3
    dropout: float = 0.0
    dropout_positions: tuple[str, ...] = ("encoder", "bottleneck", "decoder")
    # MC dropout members: "fresh" masks per image (forward pass), drawn in the graph
    # from the counter-based noise, or "frozen" masks, one per member, fixed at export.
    mc_dropout_masks: str = "fresh"
    num_samples: int = 1
    ssn_rank: int = 10
    ssn_eps: float = 1e-5
    ssn_train_samples: int = 10
    # Steps with the low-rank factor zeroed (diagonal noise and MC loss on, as the
    # paper); None: training picks the paper's share, 10/320 of its steps.
    ssn_warmup: int | None = None
    punet_latent: int = 6
    punet_beta: float = 2.5e-3
    punet_warmup: int = 100
    punet_fcomb: int = 4
    diffusion_steps: int = 10  # DDIM steps unrolled in the graph
    # "unet" (as the paper): the whole UNet denoises [x_t, image], time embedding in
    # every block, MSE on softmax(x̂); "head": a cheap head on backbone features.
    diffusion_denoiser: str = "unet"
    diffusion_input_scale: float = 0.1  # unet: x0 scaled in SNR terms (SNR x scale²)
    diffusion_logsnr: float = 10.0  # unet: logSNR clamped to [-this, this]
    diffusion_scale: float = 1.0  # head: ±scale targets

    def __post_init__(self) -> None:
        self.dropout_positions = tuple(self.dropout_positions)
        problems = []
        if self.dims not in (2, 3):
            problems.append("dims must be 2 (slices) or 3 (volumes)")
        if self.in_channels < 1:
            problems.append("in_channels must be >= 1")
        if self.num_classes < 2:
            problems.append("num_classes must be >= 2 (background first)")
        if self.width < 4 or self.width % 4:
            problems.append("width must be a multiple of 4, >= 4")
        if not 1 <= self.depth <= 6:
            problems.append("depth must be in 1..6")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        bad = set(self.dropout_positions) - {"encoder", "bottleneck", "decoder"}
        if bad:
            problems.append(f"dropout_positions has unknown {sorted(bad)}")
        if self.diffusion_denoiser not in DIFFUSION_DENOISERS:
            problems.append(f"diffusion_denoiser must be one of {', '.join(DIFFUSION_DENOISERS)}")
        if not (self.diffusion_input_scale > 0 and self.diffusion_logsnr > 0):
            problems.append("diffusion_input_scale and diffusion_logsnr must be > 0")
        if self.mc_dropout_masks not in MC_DROPOUT_MASKS:
            problems.append(f"mc_dropout_masks must be one of {', '.join(MC_DROPOUT_MASKS)}")
        if self.num_samples < 1:
            problems.append("num_samples must be >= 1")
        if self.ssn_warmup is not None and self.ssn_warmup < 0:
            problems.append("ssn_warmup must be >= 0 (or None: 10/320 of the training steps)")
        if self.ssn_rank < 1 or self.punet_latent < 1 or self.diffusion_steps < 1:
            problems.append("ssn_rank, punet_latent and diffusion_steps must be >= 1")
        if problems:
            raise UsageError("ModelConfig: " + "; ".join(problems))

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropout_positions"] = list(self.dropout_positions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(
                f"ModelConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)
