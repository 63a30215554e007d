"""Reorientation and resampling: a scan onto the model's grid, and maps back.

Two moves, each exactly invertible in its bookkeeping:

- **reorientation** to the bundle's axis codes (e.g. ``RAS``): a pure axis
  permutation and flips (``nibabel.orientations``), never an interpolation;
- **resampling** to the bundle's spacing: per axis, ``n_out = round(n_in x
  spacing_in / spacing_out)`` voxels, the voxel edges of both grids aligned
  (output voxel ``o`` samples input coordinate ``(o + 0.5) x n_in / n_out - 0.5``,
  as ``skimage.transform.resize`` in nnU-Net). Axes whose spacing already
  matches within 1 % are left alone; when nothing is resampled, no voxel is
  touched. Orders per axis: the image cubic (3) or linear (1) per the manifest,
  except nearest (0) along a thick axis when the spacing anisotropy exceeds 3
  (nnU-Net's separate-z rule); maps back linear; labels nearest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt2axcodes,
    ornt_transform,
)
from scipy import ndimage

__all__ = [
    "ANISOTROPY",
    "SPACING_TOLERANCE",
    "axcodes",
    "orientation_transform",
    "reorient",
    "resample",
    "resampled_affine",
    "target_shape",
]

#: Spacings within this relative difference count as equal (no resampling).
SPACING_TOLERANCE = 0.01
#: Above this ratio of largest to smallest spacing, the thick axis is resampled nearest.
ANISOTROPY = 3.0

Ornt = npt.NDArray[np.float64]


def axcodes(affine: npt.NDArray[np.float64]) -> str:
    """The axis codes of ``affine`` (e.g. ``"LPS"``): where each array axis points."""
    return "".join(str(c) for c in ornt2axcodes(io_orientation(affine)))


def orientation_transform(affine: npt.NDArray[np.float64], codes: str) -> Ornt | None:
    """The ``[3, 2]`` nibabel transform from ``affine``'s axes to ``codes``; None if equal."""
    t: Ornt = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes)))
    if np.array_equal(t[:, 0], np.arange(3)) and bool((t[:, 1] == 1).all()):
        return None
    return t


def reorient(a: npt.NDArray[Any], t: Ornt | None) -> npt.NDArray[Any]:
    """``a`` ``[..., X, Y, Z]`` with its last three axes permuted/flipped by ``t`` (a view).

    ``t`` maps the old axes to the new ones; ``inverse(t)`` undoes it.
    """
    if t is None:
        return a
    lead = a.ndim - 3
    moved = np.moveaxis(a, tuple(range(lead)), tuple(range(3, a.ndim))) if lead else a
    out = apply_orientation(moved, t)
    return np.moveaxis(out, tuple(range(3, a.ndim)), tuple(range(lead))) if lead else out


def inverse(t: Ornt, shape: tuple[int, ...]) -> tuple[Ornt, npt.NDArray[np.float64]]:
    """``(t_inv, aff)``: the transform undoing ``t`` and the voxel map of ``t``.

    ``aff`` is ``inv_ornt_aff(t, shape)``: ``affine @ aff`` is the affine of the
    reoriented array (``shape``: the array's shape before ``t``).
    """
    t_inv = np.empty_like(t)
    t_inv[t[:, 0].astype(int), 0] = np.arange(3)
    t_inv[t[:, 0].astype(int), 1] = t[:, 1]
    return t_inv, inv_ornt_aff(t, shape)


def target_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    """Voxels per axis at ``target`` spacing; axes within 1 % (or of one voxel) are kept."""
    out = []
    for n, s, t in zip(shape, spacing, target, strict=True):
        if n == 1 or abs(s / t - 1.0) <= SPACING_TOLERANCE:
            out.append(n)
        else:
            out.append(max(1, round(n * s / t)))
    return tuple(out)


def image_orders(
    spacing: tuple[float, ...], target: tuple[float, ...], order: int
) -> tuple[int, ...]:
    """Interpolation order per axis: ``order``, or 0 along the thick axis of an anisotropic grid."""
    orders = [order] * len(spacing)
    for sp in (spacing, target):
        if max(sp) / min(sp) > ANISOTROPY:
            orders[int(np.argmax(sp))] = 0
            break
    return tuple(orders)


def _scales(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    return np.array([i / o for i, o in zip(in_shape, out_shape, strict=True)], np.float64)


def resampled_affine(
    affine: npt.NDArray[np.float64], in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> npt.NDArray[np.float64]:
    """The affine of the ``out_shape`` grid covering the same extent as ``in_shape``."""
    scale = _scales(in_shape, out_shape)
    vox = np.eye(4)
    vox[:3, :3] = np.diag(scale)
    vox[:3, 3] = 0.5 * scale - 0.5
    out: npt.NDArray[np.float64] = affine @ vox
    return out


def resample(
    a: npt.NDArray[Any], out_shape: tuple[int, ...], orders: tuple[int, ...]
) -> npt.NDArray[Any]:
    """``a`` ``[X, Y, Z]`` resampled to ``out_shape`` with an order per axis (0, 1 or 3).

    Returns ``a`` itself when the shapes are equal. Order-0 axes are an index
    take (nearest voxel, any dtype); the others one spline pass in float32
    (``mode="nearest"``: edges repeat, no zeros bleed in).
    """
    in_shape = tuple(a.shape)
    if in_shape == tuple(out_shape):
        return a
    scale = _scales(in_shape, out_shape)
    changed = [ax for ax in range(3) if in_shape[ax] != out_shape[ax]]
    smooth = [ax for ax in changed if orders[ax] > 0]
    if smooth:
        mid = tuple(out_shape[ax] if ax in smooth else in_shape[ax] for ax in range(3))
        sc = np.array([scale[ax] if ax in smooth else 1.0 for ax in range(3)])
        order = max(orders[ax] for ax in smooth)
        a = ndimage.affine_transform(
            a.astype(np.float32, copy=False), sc, offset=0.5 * sc - 0.5, output_shape=mid,
            output=np.float32, order=order, mode="nearest", prefilter=order > 1,
        )  # fmt: skip
    for ax in changed:
        if orders[ax] == 0:
            idx = np.floor((np.arange(out_shape[ax]) + 0.5) * scale[ax]).astype(np.int64)
            a = np.take(a, np.minimum(idx, in_shape[ax] - 1), axis=ax)
    return a
