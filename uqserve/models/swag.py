"""SWAG and SWAG-D: a Gaussian over the weights from snapshots of one training run.

Training runs on its ordinary schedule (the paper's SWAG observes an ordinary run;
see ``uqserve.training``); every ``every`` steps over the last
``snapshots * every`` steps, :class:`SwagCollector` folds the raw (not EMA)
parameters into a running mean, a running mean of squares and (SWAG, not
SWAG-D) a deviation matrix ``D`` holding ``w - mean`` (the mean after the
update) of the last ``K = snapshots`` snapshots (Maddox et al. 2019).

At export, draw ``d`` of the weights is::

    var = max(sq_mean - mean**2, 1e-30)
    w   = mean + sqrt(scale) * (sqrt(var) * z_d + D.T @ z_r / sqrt(K - 1))   # SWAG
    w   = mean + sqrt(scale) * sqrt(var) * z_d                               # SWAG-D

with ``z_d`` one standard normal per weight and ``z_r`` one standard normal
per snapshot, shared by every tensor (it carries the correlations across
layers). Both come from the counter-based noise of ``(seed, draw, stream,
...)``, so a bundle's draws are reproducible from its seed and independent
of torch's generator. Each draw becomes one member graph with frozen weights;
GroupNorm has no batch statistics, so no BatchNorm update is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from uqserve._fs import atomic_path
from uqserve.errors import UsageError
from uqserve.models import noise

VAR_CLAMP = 1e-30
STREAM_SWAG_DIAG = 96
STREAM_SWAG_RANK = 97
FILE_NAME = "swag.safetensors"


@dataclass
class SwagStats:
    """The collected statistics, per parameter name (float64 moments, float32 ``D``).

    ``mean[name]`` and ``sq_mean[name]`` are shaped like the parameter;
    ``dev[name]`` is ``[rows, numel]`` (empty dict for SWAG-D). ``snapshots`` is
    the configured ``K`` (the normaliser ``sqrt(K - 1)``), ``collected`` how many
    snapshots went into the moments.
    """

    mean: dict[str, torch.Tensor]
    sq_mean: dict[str, torch.Tensor]
    dev: dict[str, torch.Tensor]
    snapshots: int
    collected: int
    diag_only: bool

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"mean.{k}": v.contiguous() for k, v in self.mean.items()}
        tensors.update({f"sq_mean.{k}": v.contiguous() for k, v in self.sq_mean.items()})
        tensors.update({f"dev.{k}": v.contiguous() for k, v in self.dev.items()})
        meta = {
            "snapshots": str(self.snapshots),
            "collected": str(self.collected),
            "diag_only": str(int(self.diag_only)),
        }
        with atomic_path(path) as tmp:  # safetensors itself creates the file 0600
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> SwagStats:
        """Read :meth:`save`'s file; UsageError naming the file when it is not one."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            snapshots, collected = int(meta["snapshots"]), int(meta["collected"])
            diag_only = bool(int(meta["diag_only"]))
        except Exception as exc:
            raise UsageError(
                f"{path}: not a SWAG statistics file ({exc}); re-run training"
            ) from exc

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(part("mean."), part("sq_mean."), part("dev."), snapshots, collected, diag_only)


class SwagCollector:
    """Running moments (and deviations) of a network's parameters, one snapshot at a time."""

    def __init__(self, net: nn.Module, snapshots: int, diag_only: bool) -> None:
        if snapshots < 2:
            raise UsageError(f"SWAG needs at least 2 snapshots, got {snapshots}")
        self.snapshots = int(snapshots)
        self.diag_only = bool(diag_only)
        self.collected = 0
        params = dict(net.named_parameters())
        self.mean = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        self.sq_mean = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        self._rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}

    @torch.no_grad()
    def collect(self, net: nn.Module) -> None:
        """Fold the current parameters in (the paper's update: mean first, then ``w - mean``)."""
        n = self.collected
        inv = 1.0 / (n + 1.0)
        for k, p in net.named_parameters():
            w = p.detach().to(torch.float64)
            self.mean[k].mul_(n * inv).add_(w * inv)
            self.sq_mean[k].mul_(n * inv).add_(w * w * inv)
            if not self.diag_only:
                rows = self._rows[k]
                rows.append((w - self.mean[k]).reshape(-1).to(torch.float32))
                del rows[: max(0, len(rows) - self.snapshots)]
        self.collected += 1

    def stats(self) -> SwagStats:
        if self.collected == 0:
            raise UsageError("no SWAG snapshot was collected; train for longer")
        dev = {} if self.diag_only else {k: torch.stack(r).cpu() for k, r in self._rows.items()}
        return SwagStats(
            {k: v.cpu().clone() for k, v in self.mean.items()},
            {k: v.cpu().clone() for k, v in self.sq_mean.items()},
            dev,
            self.snapshots,
            self.collected,
            self.diag_only,
        )


def snapshot_steps(steps: int, snapshots: int, every: int) -> list[int]:
    """0-based training steps after which a snapshot is taken: the last ``snapshots * every``
    steps, every ``every`` steps, the last one at the final step."""
    return [steps - 1 - i * every for i in reversed(range(snapshots))]


def draw_weights(
    stats: SwagStats, draw: int, seed: int, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Draw ``draw`` (>= 0) of the weights, float32 tensors per parameter name.

    SWAG-D (``stats.diag_only``) keeps only the diagonal term.
    """
    z_r: npt.NDArray[np.float64] | None = None
    if not stats.diag_only:
        rows = {int(v.shape[0]) for v in stats.dev.values()}
        if len(rows) != 1:
            raise UsageError(f"SWAG deviation matrices disagree on their rows: {sorted(rows)}")
        k = np.arange(rows.pop())
        z_r = noise.normal_np([seed, draw, STREAM_SWAG_RANK, k]).astype(np.float64)
    norm = math.sqrt(max(stats.snapshots - 1, 1))
    out = {}
    # Tensors keyed by their sorted names: the same draw however the file orders them.
    for i, name in enumerate(sorted(stats.mean)):
        m = stats.mean[name].numpy()
        var = np.maximum(stats.sq_mean[name].numpy() - m * m, VAR_CLAMP)
        idx = np.arange(m.size, dtype=np.int64)
        z_d = noise.normal_np([seed, draw, STREAM_SWAG_DIAG, i, idx]).astype(np.float64)
        delta = np.sqrt(var).reshape(-1) * z_d
        if z_r is not None:
            delta = delta + stats.dev[name].numpy().astype(np.float64).T @ z_r / norm
        w = m.reshape(-1) + math.sqrt(scale) * delta
        out[name] = torch.from_numpy(w.reshape(m.shape).astype(np.float32))
    return out


def mean_weights(stats: SwagStats) -> dict[str, torch.Tensor]:
    """The SWA solution (the running mean), float32 per parameter name."""
    return {k: v.to(torch.float32) for k, v in stats.mean.items()}


def load_parameters(net: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``weights`` into ``net``'s parameters (buffers untouched); returns ``net``."""
    params = dict(net.named_parameters())
    if set(params) != set(weights):
        missing = sorted(set(params) ^ set(weights))[:3]
        raise UsageError(f"SWAG statistics do not fit the network (e.g. {missing})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])
    return net
