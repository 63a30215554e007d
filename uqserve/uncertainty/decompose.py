"""Entropy and the TU/AU/EU decomposition of ``[M, S, K, *sp]`` probabilities (in memory)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.uncertainty.checks import (
    BoolArray,
    Float32Array,
    FloatArray,
    check_probabilities,
)

# --------------------------------------------------------------------------- entropy


def _entropy_into(out: FloatArray, p: FloatArray, positive: bool) -> FloatArray:
    """Write ``H[p]`` along axis 0 of ``p`` ``[K, *sp]`` into ``out`` ``[*sp]``.

    Loops over K so that no temporary is larger than one class plane. When
    ``positive`` is False, ``0 ln 0`` is taken as exactly 0 with a mask
    (never an epsilon).
    """
    out.fill(0)
    buf = np.empty(out.shape, dtype=out.dtype)
    for k in range(p.shape[0]):
        pk = p[k]
        if positive:
            np.log(pk, out=buf)
        else:
            buf.fill(0)
            np.log(pk, out=buf, where=pk > 0)
        np.multiply(buf, pk, out=buf)
        np.subtract(out, buf, out=out)
    return out


def entropy(p: npt.ArrayLike, axis: int = 0) -> FloatArray:
    """Shannon entropy in nats along ``axis``, with ``0 ln 0 = 0``.

    Args:
        p: probability vectors along ``axis``, e.g. ``[K, *sp]``.
        axis: the class axis.

    Returns:
        ``p``'s shape without ``axis``; float32 for float32 input, else float64.

    Raises:
        ValueError: ``p`` is not a probability array along ``axis``.
    """
    arr, pmin = check_probabilities(p, axis, "entropy(p)")
    moved = np.moveaxis(arr, axis, 0)
    out = np.empty(moved.shape[1:], dtype=arr.dtype)
    return _entropy_into(out, moved, pmin > 0)


# --------------------------------------------------------------------------- decomposition


@dataclass(frozen=True, eq=False)
class Decomposition:
    """Per-voxel predictive and uncertainty maps (nats).

    mean       ``[K, *sp]`` float32, full predictive p̄
    tu         ``[*sp]`` float32, total uncertainty H[p̄]
    au         ``[*sp]`` float32, aleatoric: mean over members of H[p̄_m]
    eu         ``[*sp]`` float32, epistemic: TU - AU (mutual information with the member)
    au_sample  ``[*sp]`` float32, within-sample (pixel) noise: mean of H[p_{m,s}]
    au_latent  ``[*sp]`` float32, disagreement between samples: AU - AU_sample
    member_foreground ``[*sp]`` bool: any member's argmax is a foreground class
    num_members the number of members M that went in
    """

    mean: Float32Array
    tu: Float32Array
    au: Float32Array
    eu: Float32Array
    au_sample: Float32Array
    au_latent: Float32Array
    member_foreground: BoolArray | None = None
    num_members: int = 0


def _foreground_of(member_mean: FloatArray) -> BoolArray:
    """``argmax_k p_k != 0`` for ``[K, *sp]``: some class k >= 1 beats class 0 strictly.

    (argmax returns the first maximum, so ties with background stay background.)
    """
    best = member_mean[1]
    if member_mean.shape[0] > 2:
        best = best.copy()
        for k in range(2, member_mean.shape[0]):
            np.maximum(best, member_mean[k], out=best)
    return np.greater(best, member_mean[0])


def segmentation(mean: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """``argmax_k mean_k`` as uint8 labels for ``[K, *sp]`` (K <= 256).

    Equal to ``np.argmax(mean, axis=0)`` (ties go to the lower class) for
    NaN-free input, in K - 1 element-wise passes: numpy's argmax over the
    outer axis of a large array was 3-8x slower.
    """
    p = np.asarray(mean)
    if p.ndim < 1 or not 1 <= p.shape[0] <= 256:
        raise UsageError(f"segmentation: expected [K, *sp] with 1 <= K <= 256, got {p.shape}")
    if p.shape[0] == 2:
        return np.greater(p[1], p[0]).view(np.uint8)
    labels = np.zeros(p.shape[1:], np.uint8)
    best = np.array(p[0], copy=True)
    for k in range(1, p.shape[0]):
        better = np.greater(p[k], best)
        labels[better] = k
        np.maximum(best, p[k], out=best)
    return labels


def _scaled_moved(a: FloatArray, perm: tuple[int, ...], factor: np.float32) -> FloatArray:
    """``a.transpose(perm) * factor`` as a new C-contiguous array (one pass; numpy
    releases the GIL, so several run in threads)."""
    moved = a.transpose(perm)
    out = np.empty(moved.shape, a.dtype)
    np.multiply(moved, factor, out=out)
    return out


def _finish(
    mean: FloatArray,
    au: FloatArray,
    au_sample: FloatArray,
    member_foreground: BoolArray,
    num_members: int,
) -> Decomposition:
    """Derive TU, EU and AU_latent in the precision of the inputs; return float32 maps."""
    tu = _entropy_into(np.empty(mean.shape[1:], mean.dtype), mean, bool(mean.min() > 0))
    eu = np.subtract(tu, au)
    # EU >= 0 and AU_latent >= 0 hold exactly (Jensen / concavity; the sample
    # entropies were checked against H[p̄_m] on the way in): what is negative
    # here is float rounding, so clip it.
    np.maximum(eu, 0, out=eu)
    au_latent = np.subtract(au, au_sample)
    np.maximum(au_latent, 0, out=au_latent)

    def f32(x: FloatArray) -> Float32Array:
        return x.astype(np.float32, copy=False)

    return Decomposition(
        mean=f32(mean),
        tu=f32(tu),
        au=f32(au),
        eu=f32(eu),
        au_sample=f32(au_sample),
        au_latent=f32(au_latent),
        member_foreground=member_foreground,
        num_members=num_members,
    )


def decompose(probs: npt.ArrayLike) -> Decomposition:
    """Batch decomposition of all members' samples (the reference formulas).

    Args:
        probs: ``[M, S, K, *sp]`` probability vectors along K (at least one
            spatial axis): member m, sample s. Softmax members have S = 1.

    Returns:
        :class:`Decomposition` with float32 maps; sums are taken in float64.

    Raises:
        ValueError: wrong rank or not probabilities.
    """
    arr = np.asarray(probs)
    if arr.ndim < 4:
        raise UsageError(
            f"decompose(probs): expected [M, S, K, *spatial] (>= 4 dimensions), got shape "
            f"{arr.shape}; add singleton member/sample axes for a single prediction"
        )
    if arr.shape[2] < 2:
        raise UsageError(f"decompose(probs): need K >= 2 classes on axis 2, got shape {arr.shape}")
    arr, pmin = check_probabilities(arr, 2, "decompose(probs)")
    positive = pmin > 0
    n_members, n_samples, k = arr.shape[:3]
    sp = arr.shape[3:]
    sum_mean = np.zeros((k, *sp), np.float64)
    sum_h = np.zeros(sp, np.float64)
    sum_hs = np.zeros(sp, np.float64)
    foreground = np.zeros(sp, bool)
    h = np.empty(sp, np.float64)
    for m in range(n_members):  # one member at a time keeps temporaries at [S, K, *sp]
        member = arr[m].astype(np.float64)
        pm = member.mean(axis=0)
        sum_mean += pm
        sum_h += _entropy_into(h, pm, positive)
        for s in range(n_samples):
            sum_hs += _entropy_into(h, member[s], positive)
        foreground |= _foreground_of(pm)
    return _finish(
        sum_mean / n_members,
        sum_h / n_members,
        sum_hs / (n_members * n_samples),
        foreground,
        n_members,
    )
