"""``preview.png``: a quick look at one prediction, readable by a radiologist.

The PNG is drawn with Pillow and numpy only (no matplotlib): a title line with
the scan's OOD verdict and score, a line naming the slices shown and why, then
one row per slice with columns image, segmentation overlay, TU, AU, EU.

* Slices are drawn in radiological convention (patient's right on the image's
  left; anterior up for axial, superior up otherwise) with orientation letters
  at the edges of the image panel (:mod:`uqserve.prediction._display`).
* The rows are the slices with the most foreground (else the most TU).
* Each uncertainty map has its own colour scale, from 0 to a round value at or
  above the map's 99.9th percentile over the whole volume (brighter voxels take
  the top colour), with ticks in nats: EU is often a hundred times smaller than
  TU and would vanish on TU's scale.
* The overlay has a legend of the classes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.prediction._display import (
    DisplayFrame,
    display_frame,
    nice_ticks,
    orient,
    pick_slices,
    tick_label,
)
from uqserve.volumes import Volume, atomic_write_bytes

# Anchor colours of matplotlib's viridis (perceptually uniform), interpolated to 256.
_VIRIDIS_ANCHORS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [109, 205, 89],
        [180, 222, 44],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
# Label colours for classes 1.. (background stays transparent).
_LABEL_COLOURS = np.array(
    [[230, 57, 70], [69, 123, 157], [244, 162, 97], [42, 157, 143], [131, 56, 236]], np.uint8
)
PANEL = 176  # pixels on the long side of each panel


def viridis_lut(n: int = 256) -> npt.NDArray[np.uint8]:
    """``[n, 3]`` uint8 colour table."""
    x = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
    t = np.linspace(0.0, 1.0, n)
    lut = np.stack([np.interp(t, x, _VIRIDIS_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def ood_line(ood: Mapping[str, Any] | None) -> str:
    """The OOD verdict and score for the title, e.g. ``OOD: in distribution (EU score ...)``."""
    ood = ood or {}
    score = ood.get("score")
    if score is None:
        return "OOD: no score"
    text = f"EU score {float(score):.3g} nats"
    if ood.get("flag") is None or ood.get("threshold") is None:
        return f"OOD: not calibrated for this model ({text})"
    verdict = "OUT OF DISTRIBUTION" if ood["flag"] else "in distribution"
    pct = ood.get("percentile")
    pct_s = f", validation percentile {float(pct):.0f}" if pct is not None else ""
    return f"OOD: {verdict} ({text} vs threshold {float(ood['threshold']):.3g}{pct_s})"


def _scale_top(u: npt.NDArray[Any]) -> float:
    """The top of a map's colour scale: its 99.9th percentile (a few outlying voxels
    would otherwise darken the rest), at least a thousandth of its maximum."""
    flat = u.reshape(-1)
    sample = flat[:: max(1, flat.size // 4_000_000)]  # a few million voxels suffice
    finite = sample[np.isfinite(sample)]
    if not finite.size:
        return 0.0
    top = float(np.percentile(finite, 99.9))
    return max(top, float(finite.max()) * 1e-3)


def _window(img: npt.NDArray[Any]) -> tuple[float, float]:
    """Grey window ``(low, span)``: 1st to 99th percentile of the finite voxels."""
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    # Extreme intensities (|x| ~ 3e38): hi - lo overflows float32; window in float64.
    lo, span = float(lo), float(hi) - float(lo)
    if not 0 < span < np.inf:
        lo, span = 0.0, 1.0
    return lo, span


def render_preview(
    volume: Volume,
    seg: npt.NDArray[Any],
    tu: npt.NDArray[np.float32],
    au: npt.NDArray[np.float32],
    eu: npt.NDArray[np.float32],
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] = (),
    ood: Mapping[str, Any] | None = None,
    title: str | None = None,
    slices: int = 3,
) -> Path:
    """Write ``preview.png``: title, rows of slices, columns image / overlay / TU / AU / EU.

    All arrays are ``[X, Y, Z]`` in the volume's order; slices are taken along
    ``volume.slice_axis``. ``classes`` names the labels (0 = background) for the
    legend; ``ood`` is the report's ``ood`` entry; ``title`` (default: the scan
    name) starts the title line.
    """
    from PIL import Image, ImageDraw, ImageFont

    axis = volume.slice_axis

    def work(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.moveaxis(a, axis, -1)

    img, seg_w = work(volume.data), work(seg)
    maps = [work(tu), work(au), work(eu)]
    frame = display_frame(volume.affine, axis)
    zs, why = pick_slices(seg_w, maps[0], slices)
    lo, span = _window(img)
    size = orient(img[:, :, 0], frame).shape
    h_mm, w_mm = size[0] * frame.mm[0], size[1] * frame.mm[1]
    scale = PANEL / max(h_mm, w_mm)
    pw, ph = max(1, round(w_mm * scale)), max(1, round(h_mm * scale))
    font = ImageFont.load_default()
    names = [str(c) for c in classes[1:]] or [
        f"class {k}" for k in range(1, max(2, int(seg_w.max(initial=0)) + 1))
    ]
    pad, line, bar_h = 6, 14, 44
    header = 3 * line + 4
    footer = max(bar_h, line * len(names) + pad)
    width = pad + 5 * (pw + pad)
    height = header + len(zs) * (ph + pad) + footer + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    name = title if title is not None else Path(str(volume.source)).name
    draw.text((pad, 2), f"{name}   {ood_line(ood)}", fill=(0, 0, 0), font=font)
    draw.text((pad, 2 + line), _rows_line(frame, zs, img.shape[2], axis, why), fill=(60, 60, 60),
              font=font)  # fmt: skip
    titles = ("image", "segmentation", "TU (nats)", "AU (nats)", "EU (nats)")
    for c, text in enumerate(titles):
        draw.text((pad + c * (pw + pad), 2 + 2 * line), text, fill=(0, 0, 0), font=font)
    tops = [nice_ticks(_scale_top(u)) for u in maps]
    lut = viridis_lut()
    for r, z in enumerate(zs):
        y = header + r * (ph + pad)
        panels = _row(img[:, :, z], seg_w[:, :, z], [u[:, :, z] for u in maps], lo, span, tops)
        for c, rgb in enumerate(panels):
            shown_rgb = orient(rgb, frame)
            tile = Image.fromarray(shown_rgb, "RGB").resize((pw, ph), Image.Resampling.NEAREST)
            canvas.paste(tile, (pad + c * (pw + pad), y))
        _letters(draw, font, frame, (pad, y, pw, ph))
        draw.text((2 * pad + pw + 3, y + ph - 13), f"slice {z}", fill=(255, 255, 0), font=font)
    y = header + len(zs) * (ph + pad)
    _legend(draw, font, names, x=pad + pw + pad, y=y)
    for c, (top, ticks) in enumerate(tops):
        _colour_bar(canvas, draw, lut, font, x=pad + (c + 2) * (pw + pad), y=y, pw=pw,
                    top=top, ticks=ticks)  # fmt: skip
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _rows_line(frame: DisplayFrame, zs: list[int], depth: int, axis: int, why: str) -> str:
    """Which slices the rows show and why, e.g. ``axial slices 6, 16, 20 of 0-23 ...``."""
    if depth == 1:
        return f"the only {frame.plane} slice; radiological view"
    shown = ", ".join(str(z) for z in zs)
    return (
        f"{frame.plane} slices {shown} of 0-{depth - 1} (array axis {axis}): the {why}; "
        "radiological view"
    )


def _row(
    img: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    maps: list[npt.NDArray[Any]],
    lo: float,
    span: float,
    tops: list[tuple[float, list[float]]],
) -> list[npt.NDArray[np.uint8]]:
    """The five RGB panels ``[a, b, 3]`` of one slice: grey, overlay, TU, AU, EU."""
    with np.errstate(over="ignore", invalid="ignore"):
        gray = np.nan_to_num(np.clip((img - lo) / span, 0, 1))
    g8 = np.round(gray * 255).astype(np.uint8)
    base = np.repeat(g8[..., None], 3, axis=2)
    lab = labels.astype(np.int64)
    over = base.copy()
    fg = lab > 0
    if fg.any():
        colours = _LABEL_COLOURS[(lab[fg] - 1) % len(_LABEL_COLOURS)]
        over[fg] = (0.45 * base[fg] + 0.55 * colours).astype(np.uint8)
    lut = viridis_lut()
    panels = [base, over]
    for u, (top, _) in zip(maps, tops, strict=True):
        idx = np.clip(np.round(np.nan_to_num(u) / top * 255), 0, 255).astype(np.intp)
        panels.append(lut[idx])
    return panels


def _letters(draw: Any, font: Any, frame: DisplayFrame, box: tuple[int, int, int, int]) -> None:
    """Orientation letters at the middle of each edge of the panel ``(x, y, w, h)``."""
    x, y, w, h = box
    top, bottom, left, right = frame.letters
    spots = ((top, x + w // 2 - 3, y + 2), (bottom, x + w // 2 - 3, y + h - 13),
             (left, x + 3, y + h // 2 - 6), (right, x + w - 9, y + h // 2 - 6))  # fmt: skip
    for text, tx, ty in spots:
        draw.text((tx + 1, ty + 1), text, fill=(0, 0, 0), font=font)
        draw.text((tx, ty), text, fill=(255, 255, 0), font=font)


def _legend(draw: Any, font: Any, names: list[str], *, x: int, y: int) -> None:
    """One coloured square and name per foreground class, under the overlay column."""
    for k, name in enumerate(names):
        colour = tuple(int(v) for v in _LABEL_COLOURS[k % len(_LABEL_COLOURS)])
        draw.rectangle((x, y + 2 + 14 * k, x + 10, y + 12 + 14 * k), fill=colour)
        draw.text((x + 15, y + 1 + 14 * k), name[:28], fill=(0, 0, 0), font=font)


def _colour_bar(
    canvas: Any, draw: Any, lut: npt.NDArray[np.uint8], font: Any,
    *, x: int, y: int, pw: int, top: float, ticks: list[float],
) -> None:  # fmt: skip
    """A 0..``top`` nats colour bar with its ticks, ``pw`` pixels wide at ``(x, y)``."""
    from PIL import Image

    bar = np.repeat(lut[np.linspace(0, 255, pw).astype(np.intp)][None], 10, axis=0)
    canvas.paste(Image.fromarray(bar, "RGB"), (x, y))
    for t in ticks:
        tx = x + round(t / top * (pw - 1))
        draw.line((tx, y + 10, tx, y + 13), fill=(0, 0, 0))
        label = tick_label(t)
        lx = min(max(x, tx - 3 * len(label)), x + pw - 6 * len(label))
        draw.text((lx, y + 14), label, fill=(0, 0, 0), font=font)
    draw.text((x, y + 28), "nats", fill=(90, 90, 90), font=font)
