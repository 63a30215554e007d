"""The optimisation loop of one member: AdamW, warm-up and cosine decay, EMA, SWAG snapshots."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from uqserve._progress import LossProgressFn
from uqserve.checkpoints import Checkpoints as Checkpoints  # the reader lives there
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.models import ModelConfig, build_network

if TYPE_CHECKING:
    from torch import nn

    from uqserve.models.swag import SwagStats
from uqserve.training.batches import _batch, _batch3d, _Slices
from uqserve.training.config import TrainConfig, TrainError


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _train_member(
    au: str,
    model_config: ModelConfig,
    slices: _Slices,
    config: TrainConfig,
    seed: int,
    mean: float,
    std: float,
    on_step: Callable[[int, float], None],
    swag: str | None = None,
) -> tuple[nn.Module, list[float], SwagStats | None]:
    """Train one network; returns it (EMA weights), its per-step losses and (``swag``:
    "swag" or "swagdiag") the SWAG statistics of its raw weights. Collecting does not
    change the run: the same seed gives the same weights with or without it.
    """
    import torch

    from uqserve.models.swag import SwagCollector, snapshot_steps

    torch.manual_seed(seed)  # seeds every CUDA device too
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EA1]))
    dev = torch.device(config.device)
    net = build_network(au, model_config).to(dev)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    collector, snaps = None, set()
    if swag is not None:
        collector = SwagCollector(net, config.swag_snapshots, diag_only=swag == "swagdiag")
        snaps = set(snapshot_steps(config.steps, config.swag_snapshots, config.swag_every))
    losses = []
    draw, crop = (_batch3d, config.patch) if model_config.dims == 3 else (_batch, config.size)
    for step in range(config.steps):
        x, y = draw(slices, rng, config.batch_size, crop, mean, std, config)
        loss, _ = net.loss(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), step=step)
        if not torch.isfinite(loss):
            raise TrainError(
                f"loss became {float(loss.detach())} at step {step}; lower `lr` or check the data"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        # EMA with a short-run warm-up so early weights do not dominate.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
                else:
                    ema[k].copy_(v)
        if collector is not None and step in snaps:
            collector.collect(net)
        losses.append(float(loss.detach()))
        on_step(step, losses[-1])
    net.load_state_dict(ema)
    net = net.cpu()  # checkpoints, validation and export run on the CPU
    return net.eval(), losses, None if collector is None else collector.stats()


def _curve(losses: Sequence[float], points: int = 50) -> list[float]:
    """Mean loss over ``points`` equal blocks of steps (fewer when training was short)."""
    block = max(1, len(losses) // points)
    arr = np.asarray(losses[: len(losses) // block * block]).reshape(-1, block)
    return [round(float(v), 5) for v in arr.mean(axis=1)]


def _member_progress(
    progress: LossProgressFn | None, task: str, steps: int
) -> Callable[[int, float], None]:
    """``on_step(step, loss)`` for one member: reports every 5th step and the last."""
    if progress is None:
        return lambda step, loss: None

    def on_step(step: int, loss: float) -> None:
        if step % 5 == 0 or step == steps - 1:
            progress(task, step + 1, steps, loss)

    return on_step
