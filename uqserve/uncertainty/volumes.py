"""Class volumes over the coherent samples: mean, spread and 95 % interval."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.uncertainty.checks import (
    finite_array,
)

# --------------------------------------------------------------------------- volumes


def volume_distribution(
    sample_counts: npt.ArrayLike, voxel_ml: float, class_names: tuple[str, ...] | list[str]
) -> dict[str, dict[str, Any]]:
    """Per-class volume over coherent samples: mean, std, 95 % interval in mL.

    Args:
        sample_counts: ``[N, K]`` (or ``[M, S, K]``) voxel counts per class of
            each coherent sample (m, s).
        voxel_ml: volume of one voxel in mL.
        class_names: K names, background first; background is not reported.

    Returns:
        ``{name: {"mean_ml", "std_ml" (ddof=1; 0 for one sample),
        "ci95_ml": [2.5 %, 97.5 %] quantiles, "n_samples"}}`` per foreground class.
    """
    counts = finite_array(sample_counts, "volume_distribution(sample_counts)")
    names = list(class_names)
    if counts.ndim < 2 or counts.shape[-1] != len(names):
        raise UsageError(
            f"volume_distribution: sample_counts has shape {counts.shape}; expected [N, K] with "
            f"K = {len(names)} classes"
        )
    if not (math.isfinite(voxel_ml) and voxel_ml > 0):
        raise UsageError(f"volume_distribution: voxel_ml must be > 0, got {voxel_ml}")
    if float(counts.min()) < 0:
        raise UsageError("volume_distribution: negative voxel counts")
    ml = counts.reshape(-1, len(names)).astype(np.float64) * voxel_ml
    n = ml.shape[0]
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names[1:], start=1):
        v = ml[:, k]
        lo, hi = np.quantile(v, [0.025, 0.975])
        out[name] = {
            "mean_ml": float(v.mean()),
            "std_ml": float(v.std(ddof=1)) if n > 1 else 0.0,
            "ci95_ml": [float(lo), float(hi)],
            "n_samples": int(n),
        }
    return out
