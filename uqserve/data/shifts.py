"""Out-of-distribution shifts with a severity knob.

``apply_shift(image, kind, severity, seed)`` corrupts a 2D image ``[C, H, W]``
(or ``[H, W]``) or a volume ``[X, Y, Z]`` (through-plane axis last). Severity
runs from 0 (the mildest setting of the shift, *not* the identity) to 1 (the
strongest). ``intensity range`` below is the 0.5-99.5 % percentile range of
the input.

What each ``kind`` does (severity 0 -> 1):

- ``noise``: additive Gaussian noise, std 0.1 -> 0.5 of the intensity range
  (the paper's range);
- ``blur``: in-plane Gaussian blur, sigma 1 % -> 4 % of the in-plane size. The
  paper quotes 5-20 %; at 128 px that is a 6-26 px sigma, which erases every
  lesion, so the range is scaled down;
- ``jpeg``: JPEG compression per slice with Pillow, quality 20 -> 10 (the
  paper's range);
- ``contrast``: CLAHE-like local contrast change (numpy): 8 x 8 tiles, 256-bin
  histograms clipped at 1.5 -> 5 times the mean bin count (the paper's CLAHE
  uses clip 5), excess redistributed, per-tile equalisation mapped with
  bilinear interpolation between tiles;
- ``inversion``: contrast inversion ``lo + hi - x`` blended with the image:
  75 % -> 100 % inverted;
- ``bias``: smooth multiplicative bias field ``exp(a f)`` (``f`` a random
  quadratic in the normalised coordinates, max abs f = 1): a = 0.3 -> 0.9;
- ``structures``: unseen bright structures that are not lesions: 2 -> 6 thin
  rings and lines, +0.3 -> +0.7 of the intensity range; in volumes they run
  through several consecutive slices.

Shifts are deterministic in ``seed``. Intensities are not clipped afterwards,
except where the shift itself clips (JPEG's 8-bit range).
"""

from __future__ import annotations

import io
from typing import overload

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from uqserve.errors import UsageError
from uqserve.volumes.base import Volume

SHIFTS = ("noise", "blur", "jpeg", "contrast", "inversion", "bias", "structures")

FloatArray = npt.NDArray[np.float32]


def _range(x: FloatArray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5]))
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return lo, hi


def _as_planes(image: npt.NDArray[np.floating], volume: bool | None) -> tuple[FloatArray, bool]:
    """Return ``[P, H, W]`` planes and whether P is a spatial (through-plane) axis."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        return x[None], False
    if x.ndim != 3:
        raise UsageError(
            f"image must be [H, W], [C, H, W] or a volume [X, Y, Z], got shape {x.shape}"
        )
    if volume is None:
        volume = x.shape[0] > 4  # more than 4 "channels" can only be a volume
    if volume:
        return np.moveaxis(x, 2, 0), True
    return x, False


def _from_planes(planes: FloatArray, like: npt.NDArray[np.floating], volume: bool) -> FloatArray:
    if np.ndim(like) == 2:
        return planes[0]
    return np.ascontiguousarray(np.moveaxis(planes, 0, 2) if volume else planes)


def _noise(p: FloatArray, s: float, rng: np.random.Generator, spatial: bool) -> FloatArray:
    lo, hi = _range(p)
    std = (0.1 + 0.4 * s) * (hi - lo)
    return (p + std * rng.standard_normal(p.shape)).astype(np.float32)


def _blur(p: FloatArray, s: float, rng: np.random.Generator, spatial: bool) -> FloatArray:
    sigma = (0.01 + 0.03 * s) * max(p.shape[1:])
    return ndimage.gaussian_filter(p, (0.0, sigma, sigma), mode="nearest").astype(np.float32)


def _jpeg(p: FloatArray, s: float, rng: np.random.Generator, spatial: bool) -> FloatArray:
    from PIL import Image  # lazy: only this shift needs Pillow

    lo, hi = _range(p)
    quality = round(20 - 10 * s)
    out = np.empty_like(p)
    for i, plane in enumerate(p):
        u8 = np.clip(np.rint((plane - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L"), dtype=np.float32)
        out[i] = lo + dec / 255.0 * (hi - lo)
    return out


def clahe(
    plane: npt.NDArray[np.floating], clip_limit: float = 5.0, tiles: int = 8, bins: int = 256
) -> FloatArray:
    """Contrast-limited adaptive histogram equalisation of one ``[H, W]`` plane in [0, 1].

    ``clip_limit`` is a multiple of the mean bin count (OpenCV's convention).
    Returns ``[H, W]`` float32 in [0, 1].
    """
    x = np.clip(np.asarray(plane, dtype=np.float64), 0.0, 1.0)
    h, w = x.shape
    th, tw = -(-h // tiles), -(-w // tiles)
    b = np.rint(x * (bins - 1)).astype(np.int64)
    ty = np.minimum(np.arange(h) // th, tiles - 1)[:, None]
    tx = np.minimum(np.arange(w) // tw, tiles - 1)[None, :]
    idx = ((ty * tiles + tx) * bins + b).ravel()
    hist = np.bincount(idx, minlength=tiles * tiles * bins).reshape(tiles, tiles, bins)
    hist = hist.astype(np.float64)
    count = hist.sum(axis=-1, keepdims=True)
    limit = np.maximum(clip_limit * count / bins, 1.0)
    excess = np.clip(hist - limit, 0.0, None).sum(axis=-1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    lut = np.cumsum(hist, axis=-1) / np.maximum(count, 1.0)  # [tiles, tiles, bins]

    def weights(
        n: int, t: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        f = (np.arange(n) + 0.5) / t - 0.5  # position in tile-centre units
        i0 = np.clip(np.floor(f), 0, tiles - 1).astype(np.int64)
        i1 = np.minimum(i0 + 1, tiles - 1)
        wgt = np.clip(f - i0, 0.0, 1.0)
        return i0, i1, wgt

    y0, y1, wy = weights(h, th)
    x0, x1, wx = weights(w, tw)
    y0, y1, wy = y0[:, None], y1[:, None], wy[:, None]
    x0, x1, wx = x0[None, :], x1[None, :], wx[None, :]
    out = (
        (1 - wy) * (1 - wx) * lut[y0, x0, b]
        + (1 - wy) * wx * lut[y0, x1, b]
        + wy * (1 - wx) * lut[y1, x0, b]
        + wy * wx * lut[y1, x1, b]
    )
    return out.astype(np.float32)


def _contrast(p: FloatArray, s: float, rng: np.random.Generator, spatial: bool) -> FloatArray:
    lo, hi = _range(p)
    clip = 1.5 + 3.5 * s
    out = np.stack([clahe((plane - lo) / (hi - lo), clip) for plane in p])
    return (lo + out * (hi - lo)).astype(np.float32)


def _inversion(p: FloatArray, s: float, rng: np.random.Generator, spatial: bool) -> FloatArray:
    lo, hi = _range(p)
    a = 0.75 + 0.25 * s
    return ((1 - a) * p + a * (lo + hi - p)).astype(np.float32)


def _coords(p: FloatArray, spatial: bool) -> list[npt.NDArray[np.float64]]:
    """Normalised coordinates in [-1, 1] of planes ``[P, H, W]``; P is constant unless spatial."""
    n0 = p.shape[0] if spatial else 1
    axes = [np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in (n0, *p.shape[1:])]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def _bias(p: FloatArray, s: float, rng: np.random.Generator, spatial: bool) -> FloatArray:
    z, y, x = _coords(p, spatial)
    terms = [y, x, y * y, x * x, y * x] + ([z, z * z, z * y, z * x] if spatial else [])
    coef = rng.uniform(-1.0, 1.0, len(terms))
    f = sum(c * t for c, t in zip(coef, terms, strict=True))
    f = np.broadcast_to(f, p.shape)
    f = (f - f.mean()) / max(float(np.abs(f - f.mean()).max()), 1e-6)
    a = 0.3 + 0.6 * s
    return (p * np.exp(a * f)).astype(np.float32)


def _structures(p: FloatArray, s: float, rng: np.random.Generator, spatial: bool) -> FloatArray:
    lo, hi = _range(p)
    _, y, x = _coords(p, spatial)
    n_planes = p.shape[0]
    out = p.copy()
    amp = (0.3 + 0.4 * s) * (hi - lo)
    thickness = 2.5 / max(p.shape[1:])  # about 1.25 px either side, in [-1, 1] units
    for k in range(2 + round(4 * s)):
        cy, cx = rng.uniform(-0.6, 0.6, 2)
        if k % 2 == 0:  # ring
            rad = rng.uniform(0.08, 0.25)
            d = np.abs(np.sqrt((y - cy) ** 2 + (x - cx) ** 2) - rad)
        else:  # line segment
            ang = rng.uniform(0, np.pi)
            half = rng.uniform(0.2, 0.5)
            dy, dx = np.sin(ang), np.cos(ang)
            t = np.clip((y - cy) * dy + (x - cx) * dx, -half, half)
            d = np.sqrt((y - cy - t * dy) ** 2 + (x - cx - t * dx) ** 2)
        profile = (amp * np.exp(-((d / thickness) ** 2))).astype(np.float32)
        if spatial and n_planes > 1:
            length = int(rng.integers(min(3, n_planes), max(4, n_planes // 2) + 1))
            start = int(rng.integers(0, max(1, n_planes - length + 1)))
            out[start : start + length] += profile
        else:
            out += profile
    return out


_FUNCS = {
    "noise": _noise,
    "blur": _blur,
    "jpeg": _jpeg,
    "contrast": _contrast,
    "inversion": _inversion,
    "bias": _bias,
    "structures": _structures,
}


@overload
def apply_shift(
    image: Volume, kind: str, severity: float = ..., seed: int = ..., *, volume: bool | None = ...
) -> Volume: ...
@overload
def apply_shift(
    image: npt.NDArray[np.floating],
    kind: str,
    severity: float = ...,
    seed: int = ...,
    *,
    volume: bool | None = ...,
) -> npt.NDArray[np.float32]: ...
def apply_shift(
    image: npt.NDArray[np.floating] | Volume,
    kind: str,
    severity: float = 0.5,
    seed: int = 0,
    *,
    volume: bool | None = None,
) -> npt.NDArray[np.float32] | Volume:
    """Corrupt ``image`` with shift ``kind`` at ``severity`` in [0, 1].

    image    ``[C, H, W]`` or ``[H, W]`` (2D), ``[X, Y, Z]`` (volume, through-plane
             axis last), or a ``Volume`` (a new ``Volume`` with the same affine
             is returned). A 3-D array is read as a volume when its first axis
             is longer than 4; pass ``volume=True/False`` to say so explicitly.
    returns  float32 array of the same shape (or a ``Volume``).
    """
    if kind not in _FUNCS:
        raise UsageError(f"unknown shift {kind!r}; choose one of {', '.join(SHIFTS)}")
    if not 0.0 <= float(severity) <= 1.0:
        raise UsageError(f"severity must be in [0, 1], got {severity}")
    if isinstance(image, Volume):
        data = apply_shift(image.data, kind, severity, seed, volume=True)
        assert isinstance(data, np.ndarray)
        return Volume(
            data=data,
            affine=image.affine.copy(),
            source=f"{image.source} [{kind} {float(severity):g}]",
            header=image.header,
            slice_axis=image.slice_axis,
            meta={**image.meta, "shift": kind, "severity": float(severity)},
        )
    arr = np.asarray(image)
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise UsageError("image must be a finite numeric array")
    planes, spatial = _as_planes(arr, volume)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SHIFTS.index(kind)]))
    out = _FUNCS[kind](planes, float(severity), rng, spatial)
    return _from_planes(out, arr, spatial)
