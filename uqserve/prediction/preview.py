"""``preview.png``: a quick look at one prediction.

The PNG is drawn with Pillow and numpy only (no matplotlib): a few slices in
rows; columns image, segmentation overlay, TU, AU, EU. The three uncertainty
columns share one colour scale, 0 to ln K nats, shown by a colour bar under
each, so the maps can be compared by eye.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

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


def preview_slices(seg: npt.NDArray[Any], n: int = 3) -> list[int]:
    """Up to ``n`` slice indices along the last axis, spread over the foreground.

    Slices are evenly spaced between the first and last slice holding
    foreground (the whole range when there is none).
    """
    depth = seg.shape[-1]
    fg = np.flatnonzero(np.any(seg.reshape(-1, depth) > 0, axis=0))
    lo, hi = (int(fg[0]), int(fg[-1])) if fg.size else (0, depth - 1)
    picks = np.linspace(lo, hi, min(n, hi - lo + 1) + 2)[1:-1] if hi > lo else np.array([lo])
    return sorted({round(float(z)) for z in picks})


def render_preview(
    volume: Volume,
    seg: npt.NDArray[Any],
    tu: npt.NDArray[np.float32],
    au: npt.NDArray[np.float32],
    eu: npt.NDArray[np.float32],
    path: str | os.PathLike[str],
    *,
    max_u: float | None = None,
    slices: int = 3,
) -> Path:
    """Write ``preview.png``: rows of slices, columns image / overlay / TU / AU / EU.

    All arrays are ``[X, Y, Z]`` in the volume's order; slices are taken along
    ``volume.slice_axis``. ``max_u`` is the top of the uncertainty colour scale
    (default: the largest TU value).
    """
    from PIL import Image, ImageDraw, ImageFont

    axis = volume.slice_axis

    def work(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.moveaxis(a, axis, -1)

    img, seg_w = work(volume.data), work(seg)
    maps = [work(tu), work(au), work(eu)]
    top = float(max_u) if max_u else max(float(np.max(tu)), 1e-6)
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    # Extreme intensities (|x| ~ 3e38): hi - lo overflows float32; window in float64.
    lo, span = float(lo), float(hi) - float(lo)
    if not 0 < span < np.inf:
        lo, span = 0.0, 1.0
    sp = [s for i, s in enumerate(volume.spacing) if i != axis]
    rows_px, cols_px = img.shape[0] * sp[0], img.shape[1] * sp[1]
    scale = PANEL / max(rows_px, cols_px)
    # Display with the first array axis horizontal and the second pointing up.
    pw, ph = max(1, round(rows_px * scale)), max(1, round(cols_px * scale))
    lut = viridis_lut()
    font = ImageFont.load_default()
    zs = preview_slices(seg_w, slices)
    pad, header, bar_h = 6, 18, 34
    width = pad + 5 * (pw + pad)
    height = header + len(zs) * (ph + pad) + bar_h + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = ("image", "segmentation", "TU (nats)", "AU (nats)", "EU (nats)")
    for c, title in enumerate(titles):
        draw.text((pad + c * (pw + pad), 3), title, fill=(0, 0, 0), font=font)

    def to_panel(rgb: npt.NDArray[np.uint8]) -> Image.Image:
        disp = np.ascontiguousarray(np.rot90(rgb, k=1, axes=(0, 1)))  # [Y (up), X, 3]
        return Image.fromarray(disp, "RGB").resize((pw, ph), Image.Resampling.NEAREST)

    for r, z in enumerate(zs):
        y = header + r * (ph + pad)
        with np.errstate(over="ignore", invalid="ignore"):
            gray = np.nan_to_num(np.clip((img[:, :, z] - lo) / span, 0, 1))
        g8 = np.round(gray * 255).astype(np.uint8)
        base = np.repeat(g8[..., None], 3, axis=2)
        labels = seg_w[:, :, z].astype(np.int64)
        over = base.copy()
        fg = labels > 0
        if fg.any():
            colours = _LABEL_COLOURS[(labels[fg] - 1) % len(_LABEL_COLOURS)]
            over[fg] = (0.45 * base[fg] + 0.55 * colours).astype(np.uint8)
        panels = [base, over]
        for u in maps:
            idx = np.clip(np.round(u[:, :, z] / top * 255), 0, 255).astype(np.intp)
            panels.append(lut[idx])
        for c, rgb in enumerate(panels):
            canvas.paste(to_panel(rgb), (pad + c * (pw + pad), y))
        draw.text((2, y + 2), f"z={z}", fill=(255, 255, 0), font=font)
    # Colour bars under the three uncertainty columns.
    _colour_bars(canvas, draw, lut, font, y=header + len(zs) * (ph + pad), pw=pw, pad=pad, top=top)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _colour_bars(
    canvas: Any, draw: Any, lut: npt.NDArray[np.uint8], font: Any,
    *, y: int, pw: int, pad: int, top: float,
) -> None:  # fmt: skip
    """Draw a 0..``top`` colour bar under each of the three uncertainty columns."""
    from PIL import Image

    bar = np.repeat(lut[np.linspace(0, 255, pw).astype(np.intp)][None], 10, axis=0)
    for c in range(2, 5):
        x = pad + c * (pw + pad)
        canvas.paste(Image.fromarray(bar, "RGB"), (x, y))
        draw.text((x, y + 12), "0", fill=(0, 0, 0), font=font)
        label = f"{top:.2f}"
        draw.text((x + pw - 6 * len(label), y + 12), label, fill=(0, 0, 0), font=font)
