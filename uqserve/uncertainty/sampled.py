"""A scan's AU~EU entanglement from a fixed-size, seeded subsample of its voxels.

The exact :func:`~uqserve.uncertainty.scan_entanglement` ranks every voxel
with TU > 0.05 ln K: two sorts of up to the whole scan (78 M voxels for a
512 x 512 x 300 CT, seconds of host time). Spearman's rho of a simple random
sample of ``n`` of those ``N`` voxels estimates the scan's rho; its standard
error is estimated from the sample itself, distribution-free, with the
influence function of rho = 12 E[F(AU) G(EU)] - 3:

    SE = 12 sd(F_i G_i + B_i + C_i) / sqrt(n) * sqrt(1 - n / N)

where F_i, G_i are voxel i's rank fractions in the sample, B_i the sample
mean of G over voxels whose AU ranks at or above i's, C_i the same with the
roles swapped, and sqrt(1 - n/N) the finite-population correction. (A
bivariate-normal formula understated the spread of real maps by 1.4x.) The
sample is drawn without replacement, uniformly among the qualifying voxels,
from a generator seeded with the prediction's seed, so the same scan and
seed give the same number. A scan with at most ``n`` qualifying voxels is
computed exactly, by the very same code as ``scan_entanglement``
(bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.uncertainty.checks import finite_array
from uqserve.uncertainty.entanglement import _doubled_ranks, scan_entanglement

__all__ = ["SCORE_SAMPLE", "SampledEntanglement", "sampled_scan_entanglement"]

#: Qualifying voxels the scan's entanglement is estimated from (predict's default).
SCORE_SAMPLE = 2**22
# Voxels per step of the sampling pass: bounds its temporaries (indices: 8 MiB).
_CHUNK = 2**20


@dataclass(frozen=True)
class SampledEntanglement:
    """The scan's AU~EU Spearman rho, and how it was obtained.

    ``rho``: None as for ``scan_entanglement`` (too few voxels, a constant map).
    ``size``: voxels ranked; ``population``: voxels with TU > 0.05 ln K;
    ``standard_error``: of ``rho`` against the exact value (0 when exact).
    """

    rho: float | None
    size: int
    population: int
    standard_error: float

    @property
    def exact(self) -> bool:
        return self.size == self.population


def sampled_scan_entanglement(
    tu: npt.ArrayLike,
    au: npt.ArrayLike,
    eu: npt.ArrayLike,
    num_classes: int,
    *,
    size: int = SCORE_SAMPLE,
    seed: int = 0,
    min_voxels: int = 100,
) -> SampledEntanglement:
    """``scan_entanglement`` over at most ``size`` qualifying voxels drawn with ``seed``.

    Args:
        tu, au, eu: ``[*sp]`` float maps (nats) from one decomposition.
        num_classes: K.
        size: the subsample's size (>= ``min_voxels``).
        seed: the sampling generator's seed (0 .. 2^63 - 1).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < max(min_voxels, 4):
        raise UsageError(f"size must be an integer >= {max(min_voxels, 4)}, got {size!r}")
    t = finite_array(tu, "scan_entanglement(tu)")
    if num_classes < 2:
        raise UsageError(f"scan_entanglement: num_classes must be >= 2, got {num_classes}")
    mask = t > 0.05 * math.log(num_classes)
    population = int(np.count_nonzero(mask))
    if population <= size:
        rho = scan_entanglement(tu, au, eu, num_classes, min_voxels)
        return SampledEntanglement(rho, population, population, 0.0)
    a = finite_array(au, "scan_entanglement(au)")
    e = finite_array(eu, "scan_entanglement(eu)")
    if not t.shape == a.shape == e.shape:
        raise UsageError(
            f"scan_entanglement: shapes differ: tu {t.shape}, au {a.shape}, eu {e.shape}"
        )
    idx = _sample_true(mask.reshape(-1), size, np.random.default_rng(seed))
    rho, se = _rho_and_se(a.reshape(-1)[idx], e.reshape(-1)[idx], population)
    return SampledEntanglement(rho, size, population, se)


def _sample_true(
    mask: npt.NDArray[np.bool_], size: int, rng: np.random.Generator
) -> npt.NDArray[np.intp]:
    """``size`` flat indices drawn uniformly without replacement among ``mask``'s True.

    How many come from each chunk of ``_CHUNK`` voxels follows the multivariate
    hypergeometric law (exactly a simple random sample), then each chunk picks
    its own; no array of all the True indices is ever made. Sorted indices.
    """
    starts = range(0, mask.size, _CHUNK)
    counts = np.array([np.count_nonzero(mask[i : i + _CHUNK]) for i in starts], np.int64)
    per_chunk = rng.multivariate_hypergeometric(counts, size, method="marginals")
    out = np.empty(size, np.intp)
    filled = 0
    for i, k in zip(starts, per_chunk.tolist(), strict=True):
        if k == 0:
            continue
        where = np.flatnonzero(mask[i : i + _CHUNK])
        pick = np.sort(rng.choice(where.size, size=k, replace=False))
        out[filled : filled + k] = i + where[pick]
        filled += k
    return out


def _rho_and_se(
    a: npt.NDArray[np.floating[Any]], b: npt.NDArray[np.floating[Any]], population: int
) -> tuple[float | None, float]:
    """Spearman's rho of the samples ``a``, ``b`` ``[n]`` and its standard error as an
    estimate of the rho of all ``population`` values (module docstring)."""
    n = a.size
    ra2, rb2 = _doubled_ranks(a), _doubled_ranks(b)  # 2 x ranks (ties: average), integers
    u, v = np.multiply(ra2, 0.5 / n), np.multiply(rb2, 0.5 / n)  # rank fractions in (0, 1]
    du, dv = u - u.mean(), v - v.mean()
    # einsum, not `@`: a BLAS dot product's last digit depends on its thread count.
    den = math.sqrt(float(np.einsum("i,i->", du, du)) * float(np.einsum("i,i->", dv, dv)))
    if den == 0:
        return None, 0.0  # a constant input: no rank correlation defined
    rho = float(np.clip(np.einsum("i,i->", du, dv) / den, -1.0, 1.0))
    del du, dv
    influence = u * v
    influence += _mean_at_or_above(ra2, v)
    influence += _mean_at_or_above(rb2, u)
    se = 12.0 * float(influence.std()) / math.sqrt(n) * math.sqrt(1.0 - n / population)
    return rho, se


def _mean_at_or_above(
    ranks2: npt.NDArray[np.unsignedinteger[Any]], w: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """For each i, ``sum(w[j] for ranks2[j] >= ranks2[i]) / n``, by a suffix sum (no sort)."""
    per_rank = np.bincount(ranks2, weights=w)
    suffix = np.cumsum(per_rank[::-1])[::-1]
    out: npt.NDArray[np.float64] = suffix[ranks2] / w.size
    return out
