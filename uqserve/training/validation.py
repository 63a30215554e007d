"""Held-out Dice against the annotators' majority."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from uqserve.checkpoints import Checkpoints as Checkpoints  # the reader lives there
from uqserve.checkpoints import load_checkpoints as load_checkpoints
from uqserve.data import (
    SyntheticSet,
    make_dataset,
)
from uqserve.models import ModelConfig

if TYPE_CHECKING:
    from torch import nn

from uqserve.training.batches import _Slices
from uqserve.training.config import TrainConfig


def majority_vote(annotations: npt.NDArray[np.integer], num_classes: int) -> npt.NDArray[np.uint8]:
    """Per-voxel majority label of ``annotations [A, ...]``; ties go to the lower class id."""
    counts = np.stack([(annotations == k).sum(axis=0) for k in range(num_classes)])
    return np.argmax(counts, axis=0).astype(np.uint8)


def dice_vs_majority(
    net: nn.Module,
    images: npt.NDArray[np.float32],
    annotations: npt.NDArray[np.uint8],
    mean: float,
    std: float,
    num_classes: int,
    batch: int = 16,
) -> float:
    """Foreground Dice (pooled over images, averaged over classes) of ``net``'s argmax.

    ``images [N, 1, H, W]`` raw, ``annotations [N, A, H, W]``; the reference is the
    annotators' majority vote. The prediction is the argmax of the mean over samples.
    """
    import torch

    torch.manual_seed(0)
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(((images[i : i + batch] - mean) / std).astype(np.float32))
            probs = net(x)  # [B, S, K, H, W]
            preds.append(probs.mean(dim=1).argmax(dim=1).numpy())
    pred = np.concatenate(preds)
    ref = np.stack([majority_vote(a, num_classes) for a in annotations])
    scores = []
    for k in range(1, num_classes):
        p, r = pred == k, ref == k
        denom = int(p.sum() + r.sum())
        if denom:
            scores.append(2.0 * float((p & r).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0


def _validation_set(
    slices: _Slices, config: TrainConfig, model_config: ModelConfig
) -> SyntheticSet | None:
    """Held-out synthetic slices for each member's Dice (synthetic training data only)."""
    if (
        slices.description["source"] != "synthetic"
        or config.validate <= 0
        or model_config.dims == 3
    ):
        return None
    return make_dataset(
        config.validate,
        config.data_seed + 1_000_003,  # held out: never the training seeds
        size=config.image_size,
        ambiguity=config.ambiguity,
        num_classes=model_config.num_classes,
        num_annotators=config.num_annotators,
    )
