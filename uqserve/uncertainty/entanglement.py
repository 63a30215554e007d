"""Entanglement of AU and EU: rank correlations and the paper's Δ scores."""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.uncertainty.checks import (
    BoolArray,
    finite_array,
    scores_1d,
)

# Spearman ranks both sides in parallel threads from this many values on.
_PARALLEL_RANKS = 1 << 16
# Values per chunk of the rank passes after the sort (temporaries of a few MB).
_RANK_CHUNK = 1 << 20

# --------------------------------------------------------------------------- entanglement


def _rank(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    return np.multiply(_doubled_ranks(x), 0.5)  # exact: integers and halves


def _doubled_ranks(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.unsignedinteger[Any]]:
    """2 x the ranks of :func:`_rank`, as unsigned integers (uint32 below 2^31 values).

    The scatter into voxel order is random access: 4-byte ranks made it about a
    third faster than float64 ones. Memory: the sorted keys (8 bytes per value),
    the ranks (4) and one flag per value; the rest goes in chunks. (Fresh pages
    cost: with 37 bytes per value of temporaries a first call took twice as
    long as the next.)
    """
    n = x.size
    order, xs = _sorted_order(x)
    new_run = np.empty(n, bool)  # runs of equal values share their average rank
    new_run[:1] = True
    np.not_equal(xs[1:], xs[:-1], out=new_run[1:])
    del xs
    starts = np.flatnonzero(new_run)
    del new_run
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1:] = n
    dtype = np.uint32 if 2 * n < 2**32 else np.uint64
    doubled = (starts + ends + 1).astype(dtype)  # 2 x the mean of ranks start+1 .. end
    ranks: npt.NDArray[np.unsignedinteger[Any]] = np.empty(n, dtype)
    for i in range(0, n, _RANK_CHUNK):
        j = min(i + _RANK_CHUNK, n)
        r0 = int(np.searchsorted(starts, i, "right")) - 1  # the runs that meet [i, j)
        r1 = int(np.searchsorted(starts, j, "left"))
        lengths = np.minimum(ends[r0:r1], j) - np.maximum(starts[r0:r1], i)
        ranks[order[i:j]] = np.repeat(doubled[r0:r1], lengths)
    return ranks


def _sorted_order(
    x: npt.NDArray[np.floating[Any]],
) -> tuple[npt.NDArray[np.integer[Any]], npt.NDArray[Any]]:
    """A sorting permutation of ``x`` and keys that are equal exactly where ``x`` is.

    Tied values all get their run's average rank, so any sorting order gives the
    same ranks. For float32 the value's order-preserving bits (high word) and the
    index (low word) are written into one uint64 and sorted directly: 5-9x faster
    than ``argsort`` (an indirect sort) on millions of voxels. Both come back as
    views of the sorted keys, no copies.
    """
    n = x.size
    if x.dtype != np.float32 or n >= 2**32:
        order = np.argsort(x, kind="quicksort")
        return order, x[order]
    keys = np.empty(n, np.uint64)
    words = keys.view(np.uint32).reshape(n, 2)
    lo, hi = (0, 1) if sys.byteorder == "little" else (1, 0)
    bits = words[:, hi]
    np.add(x.ravel(), np.float32(0), out=bits.view(np.float32))  # -0.0 becomes 0.0
    if n and float(x.min()) < 0:
        # IEEE order as unsigned integers: flip all bits of negatives, the sign bit of
        # others. Non-negative floats (entropies, every map here) already order so.
        flip = np.where(bits >> 31 == 1, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
        np.bitwise_xor(bits, flip, out=bits)
    for i in range(0, n, _RANK_CHUNK):
        words[i : i + _RANK_CHUNK, lo] = np.arange(i, min(i + _RANK_CHUNK, n), dtype=np.uint32)
    keys.sort()
    return words[:, lo], words[:, hi]


def _spearman(
    a: npt.NDArray[np.floating[Any]],
    b: npt.NDArray[np.floating[Any]],
    mask: BoolArray | None = None,
) -> float | None:
    """Spearman's rho of ``a`` and ``b`` (same shape), over ``mask`` if given."""

    def doubled_ranks(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.unsignedinteger[Any]]:
        return _doubled_ranks(x.ravel() if mask is None else x[mask])

    if a.size >= _PARALLEL_RANKS:
        # Two large sorts: numpy releases the GIL, so they run on two cores.
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(doubled_ranks, b)
            ra2 = doubled_ranks(a)
            rb2 = future.result()
    else:
        ra2, rb2 = doubled_ranks(a), doubled_ranks(b)
    # The sorted keys are gone by now: float64 ranks do not add to their peak.
    ra, rb = np.multiply(ra2, 0.5), np.multiply(rb2, 0.5)
    del ra2, rb2
    ra -= ra.mean()
    rb -= rb.mean()
    # einsum, not `@`: BLAS splits a dot product over its threads, so the last digit
    # would depend on the thread count; einsum's loop sums in one fixed order.
    den = math.sqrt(float(np.einsum("i,i->", ra, ra)) * float(np.einsum("i,i->", rb, rb)))
    if den == 0:
        return None  # a constant input: no rank correlation defined
    return float(np.clip(np.einsum("i,i->", ra, rb) / den, -1.0, 1.0))


def rank_correlation(au_scores: npt.ArrayLike, eu_scores: npt.ArrayLike) -> float | None:
    """Spearman rank correlation between image-level AU and EU across a test set.

    Mucsányi et al. (NeurIPS 2024)'s measure. None when either side is constant.

    Raises:
        ValueError: different lengths, fewer than 2 values, non-finite values.
    """
    a = scores_1d(au_scores, "rank_correlation(au_scores)", 2)
    b = scores_1d(eu_scores, "rank_correlation(eu_scores)", 2)
    if a.shape != b.shape:
        raise UsageError(f"rank_correlation: {a.size} AU scores but {b.size} EU scores")
    return _spearman(a, b)


def scan_entanglement(
    tu: npt.ArrayLike,
    au: npt.ArrayLike,
    eu: npt.ArrayLike,
    num_classes: int,
    min_voxels: int = 100,
) -> float | None:
    """Per-scan Spearman correlation of AU and EU over voxels with TU > 0.05 ln K.

    Near 1: EU merely mirrors AU in this scan. Returns None when fewer than
    ``min_voxels`` voxels qualify or AU or EU is constant there.

    Args:
        tu, au, eu: ``[*sp]`` maps from one :class:`Decomposition`.
        num_classes: K.
    """
    if num_classes < 2:
        raise UsageError(f"scan_entanglement: num_classes must be >= 2, got {num_classes}")
    t = finite_array(tu, "scan_entanglement(tu)")
    a = finite_array(au, "scan_entanglement(au)")
    e = finite_array(eu, "scan_entanglement(eu)")
    if not t.shape == a.shape == e.shape:
        raise UsageError(
            f"scan_entanglement: shapes differ: tu {t.shape}, au {a.shape}, eu {e.shape}"
        )
    mask = t > 0.05 * math.log(num_classes)
    selected = int(np.count_nonzero(mask))
    if selected < min_voxels:
        return None
    # Ranks only need the order: sort the maps' own float32 values, not float64 copies.
    return _spearman(a, e, None if selected == mask.size else mask)


def entanglement_delta(u_correct: float, u_wrong: float, higher_is_better: bool) -> float:
    """The paper's Δ = s (atan2(U_c, U_w) - π/4) / (π/4), s = +1 if higher is better else -1.

    1: the wrong uncertainty type carries no signal (disentangled); 0: it does
    as well as the correct one (entangled); < 0: it does better.
    """
    if not (math.isfinite(u_correct) and math.isfinite(u_wrong)):
        raise UsageError(
            f"entanglement_delta: performances must be finite, got {u_correct}, {u_wrong}"
        )
    s = 1.0 if higher_is_better else -1.0
    return s * (math.atan2(u_correct, u_wrong) - math.pi / 4) / (math.pi / 4)


def ood_delta(auroc_eu: float, auroc_au: float) -> float:
    """Δ for OOD detection: AUROC of image-level EU (correct) vs AU (wrong), higher better."""
    return entanglement_delta(auroc_eu, auroc_au, higher_is_better=True)


def ambiguity_delta(ncc_au: float, ncc_eu: float) -> float:
    """Δ for ambiguity modelling: NCC of the AU map (correct) vs the EU map (wrong)."""
    return entanglement_delta(ncc_au, ncc_eu, higher_is_better=True)


def calibration_delta(ace_tu: float, ace_au: float, ace_eu: float) -> float:
    """Δ for calibration: ACE of TU (correct) vs min(ACE of AU, ACE of EU), lower better."""
    return entanglement_delta(ace_tu, min(ace_au, ace_eu), higher_is_better=False)
