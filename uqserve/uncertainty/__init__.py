"""Uncertainty decomposition, streaming accumulation, image scores, OOD and Δ.

Pure numpy; imports no I/O library (only the aggregator names of
``uqserve.contracts``). The formulas (docs: concepts, uncertainty decomposition):

* ``p̄_m = mean_s p_{m,s}``, ``p̄ = mean_m p̄_m``
* ``TU = H[p̄]``, ``AU = mean_m H[p̄_m]``, ``EU = TU - AU`` (>= 0 by Jensen)
* ``AU_sample = mean_{m,s} H[p_{m,s}]``, ``AU_latent = AU - AU_sample``

with ``H[p] = -sum_k p_k ln p_k`` in nats and ``0 ln 0 = 0`` (exactly: no
epsilon). Shapes use ``M`` members, ``S`` samples per member, ``K`` classes
and ``*sp`` spatial axes (e.g. ``[H, W]`` or ``[X, Y, Z]``).

One module per job; every public name is importable from here:

| module | job |
| --- | --- |
| `checks` | input checks: probabilities, finite maps |
| `decompose` | entropy, `decompose` (in memory), `segmentation` |
| `accumulator` | `Accumulator`: the same decomposition streamed slab by slab |
| `scores` | `image_score`, `ImageScorer`: one number per map |
| `ood` | the OOD threshold and decision |
| `entanglement` | AU~EU rank correlation, the paper's Δ scores |
| `sampled` | a scan's entanglement from a fixed-size seeded subsample |
| `volumes` | class volumes over the coherent samples |

Example:
    >>> import numpy as np
    >>> from uqserve.uncertainty import Accumulator, decompose
    >>> members = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # [M, K]
    >>> d = decompose(members[:, None, :, None])  # [M, S=1, K, 1 voxel]
    >>> round(float(d.eu[0]), 4)  # two confident members that disagree: ln 2
    0.6931
"""

from __future__ import annotations

from uqserve.contracts import AGGREGATORS
from uqserve.uncertainty.accumulator import Accumulator, PreparedMember, prepare_member
from uqserve.uncertainty.checks import SUM_TOLERANCE, check_probabilities, finite_array
from uqserve.uncertainty.decompose import Decomposition, decompose, entropy, segmentation
from uqserve.uncertainty.entanglement import (
    ambiguity_delta,
    calibration_delta,
    entanglement_delta,
    ood_delta,
    rank_correlation,
    scan_entanglement,
)
from uqserve.uncertainty.ood import OODResult, calibrate_ood_threshold, ood_decision
from uqserve.uncertainty.sampled import (
    SCORE_SAMPLE,
    SampledEntanglement,
    sampled_scan_entanglement,
)
from uqserve.uncertainty.scores import ImageScorer, image_score
from uqserve.uncertainty.volumes import volume_distribution

__all__ = [
    "AGGREGATORS",
    "SCORE_SAMPLE",
    "SUM_TOLERANCE",
    "Accumulator",
    "Decomposition",
    "ImageScorer",
    "OODResult",
    "PreparedMember",
    "SampledEntanglement",
    "ambiguity_delta",
    "calibrate_ood_threshold",
    "calibration_delta",
    "check_probabilities",
    "decompose",
    "entanglement_delta",
    "entropy",
    "finite_array",
    "image_score",
    "ood_decision",
    "ood_delta",
    "prepare_member",
    "rank_correlation",
    "sampled_scan_entanglement",
    "scan_entanglement",
    "segmentation",
    "volume_distribution",
]
