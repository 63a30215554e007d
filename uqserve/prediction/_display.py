"""Pure helpers for ``preview.png``: radiological orientation, slice choice, colour-bar ticks.

Radiological convention (how radiologists read cross-sections): the patient's
right is on the image's left, and

* axial slices have anterior up,
* coronal slices have superior up,
* sagittal slices have superior up and anterior on the image's left.

Directions are RAS+ (the volume affine's space): ``+x`` = patient right,
``+y`` = anterior, ``+z`` = superior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DisplayFrame", "display_frame", "nice_ticks", "orient", "pick_slices"]

_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of x, y, z
# (screen right, screen up) in RAS for a slice whose normal is mostly along x, y or z.
_SCREEN = {
    0: (np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, 1.0])),  # sagittal: right = P, up = S
    1: (np.array([-1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])),  # coronal: right = L, up = S
    2: (np.array([-1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),  # axial: right = L, up = A
}
PLANE_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


@dataclass(frozen=True)
class DisplayFrame:
    """How to turn a slice ``[a, b]`` (the two in-plane array axes, in order) into a
    screen image ``[rows (top to bottom), columns (left to right)]``.

    transpose   swap the in-plane axes first: the first one runs horizontally
    flip_rows, flip_cols  reverse the screen rows / columns after the transpose
    letters     orientation letters at the (top, bottom, left, right) edges
    mm          screen (height, width) of one pixel in mm
    plane       ``axial``, ``coronal`` or ``sagittal`` (the closest)
    """

    transpose: bool
    flip_rows: bool
    flip_cols: bool
    letters: tuple[str, str, str, str]
    mm: tuple[float, float]
    plane: str


def _letter(v: npt.NDArray[np.float64]) -> str:
    i = int(np.argmax(np.abs(v)))
    return _LETTERS[i][int(v[i] > 0)]


def display_frame(affine: npt.NDArray[np.float64], slice_axis: int) -> DisplayFrame:
    """The radiological display of slices along ``slice_axis`` of a volume with ``affine``."""
    a, b = (i for i in range(3) if i != slice_axis)
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    da, db = cols[:, a], cols[:, b]
    normal = np.cross(da, db)
    plane = int(np.argmax(np.abs(normal)))
    right, up = _SCREEN[plane]
    # The in-plane axis closer to the screen's horizontal runs horizontally.
    na, nb = float(np.linalg.norm(da)) or 1.0, float(np.linalg.norm(db)) or 1.0
    a_horizontal = abs(da @ right) / na >= abs(db @ right) / nb
    dh, dv = (da, db) if a_horizontal else (db, da)
    flip_cols = bool(dh @ right < 0)
    flip_rows = bool(dv @ up > 0)  # row 0 is the top: index must grow downwards
    screen_right = dh if not flip_cols else -dh
    screen_up = dv if flip_rows else -dv
    letters = (
        _letter(screen_up),
        _letter(-screen_up),
        _letter(-screen_right),
        _letter(screen_right),
    )
    mm = (float(np.linalg.norm(dv)) or 1.0, float(np.linalg.norm(dh)) or 1.0)
    return DisplayFrame(
        transpose=bool(a_horizontal),
        flip_rows=flip_rows,
        flip_cols=flip_cols,
        letters=letters,
        mm=mm,
        plane=PLANE_NAMES[plane],
    )


def orient(panel: npt.NDArray[Any], frame: DisplayFrame) -> npt.NDArray[Any]:
    """A slice ``[a, b, ...]`` as a screen image ``[rows, cols, ...]`` per ``frame``."""
    out = np.swapaxes(panel, 0, 1) if frame.transpose else panel
    if frame.flip_rows:
        out = out[::-1]
    if frame.flip_cols:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def pick_slices(
    seg: npt.NDArray[Any], tu: npt.NDArray[np.floating[Any]], n: int = 3
) -> tuple[list[int], str]:
    """Up to ``n`` slices along the last axis and why they were chosen.

    The slices with the most foreground voxels (``seg > 0``); without
    foreground, the slices with the most total uncertainty (sum of TU). Picks
    keep a gap of about a sixth of the range holding foreground (so three rows
    do not show three neighbours) when there is room. Returned in slice order.
    """
    depth = seg.shape[-1]
    fg = np.count_nonzero(seg.reshape(-1, depth) > 0, axis=0)
    if fg.any():
        score, why = fg.astype(np.float64), "most foreground"
        held = np.flatnonzero(fg)
        gap = max(1, (int(held[-1]) - int(held[0]) + 1) // (2 * n))
    else:
        score = np.asarray(tu, dtype=np.float64).reshape(-1, depth).sum(axis=0)
        why, gap = "most uncertainty (TU), no foreground", max(1, depth // (2 * n))
    chosen: list[int] = []
    for z in np.argsort(-score, kind="stable"):
        if len(chosen) == n:
            break
        if all(abs(int(z) - c) >= gap for c in chosen):
            chosen.append(int(z))
    return sorted(chosen), why


def nice_ticks(top: float, most: int = 4) -> tuple[float, list[float]]:
    """A round colour-bar top at or above ``top`` and ticks from 0 (at most ``most`` steps).

    >>> nice_ticks(0.6931)
    (0.8, [0.0, 0.2, 0.4, 0.6, 0.8])
    """
    top = float(top) if math.isfinite(top) and top > 0 else 1.0
    exp = math.floor(math.log10(top / most))
    for mantissa in (1, 2, 2.5, 5, 10):
        step = mantissa * 10.0**exp
        if top / step <= most + 1e-9:
            break
    count = math.ceil(top / step - 1e-9)
    return count * step, [round(i * step, 12) for i in range(count + 1)]


def tick_label(value: float) -> str:
    """Short, exact-looking tick text: ``0``, ``0.2``, ``0.0025``, ``1.5e-05``."""
    if value == 0:
        return "0"
    text = f"{value:.3g}"
    return text if "e" not in text or abs(value) < 1e-4 else f"{value:f}".rstrip("0")
