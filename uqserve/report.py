"""Presenting one prediction: the terminal summary table and the PNG quick-look.

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
from rich.table import Table
from rich.text import Text

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


def _fmt_ml(v: dict[str, Any]) -> str:
    lo, hi = v["ci95_ml"]
    return f"{v['mean_ml']:.2f} ± {v['std_ml']:.2f} mL  [95 %: {lo:.2f}–{hi:.2f}]"


def _num(x: Any, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary_table(report: dict[str, Any]) -> Table:
    """A short two-column rich table of one scan's report."""
    scan, bundle, scores = report["scan"], report["bundle"], report["scores"]
    t = Table(
        title=Text(f"uqserve predict · {scan['name']}"), show_header=False, title_justify="left"
    )
    t.add_column("", style="bold")
    t.add_column("")
    shape = "x".join(str(s) for s in scan["shape"])
    spacing = "x".join(f"{s:g}" for s in scan["spacing"])
    t.add_row("scan", f"{shape} voxels, {spacing} mm")
    t.add_row(
        "bundle",
        Text(
            f"{bundle['name']} ({bundle['au']}-{bundle['eu']}, M={bundle['members']}, "
            f"S={bundle['samples']})"
        ),
    )
    rt = report["runtime"]
    t.add_row("run", Text(f"seed {report['seed']}, {rt['name']} on {rt['device']}"))
    t.add_row(
        f"uncertainty ({scores['aggregator']})",
        f"TU {_num(scores['tu'])}, AU {_num(scores['au'])}, EU {_num(scores['eu'])} nats",
    )
    t.add_row("AU parts", f"sample {_num(scores['au_sample'])}, latent {_num(scores['au_latent'])}")
    ood = report["ood"]
    # Styles as Text, never markup: names in this table are user text (`[bold]x.nii.gz`).
    if ood.get("flag") is None:
        verdict = ("no threshold (not calibrated or no EU method)", "")
    else:
        flagged = ood["flag"]
        verdict = ("OUT OF DISTRIBUTION", "bold red") if flagged else ("in distribution", "green")
    pct = (
        "" if ood.get("percentile") is None else f" (validation percentile {ood['percentile']:.0f})"
    )
    t.add_row(
        "OOD",
        Text.assemble(
            verdict, f": EU score {_num(ood['score'])} vs τ {_num(ood['threshold'])}{pct}"
        ),
    )
    ent = report["entanglement"]
    t.add_row(
        "entanglement",
        f"scan AU~EU Spearman {_num(ent['scan'], 3)}"
        + ("" if not ent.get("bundle") else f"; bundle {_short(ent['bundle'])}"),
    )
    for name, v in report["volumes"].items():
        t.add_row(Text(f"volume {name}"), Text(_fmt_ml(v)))
    for w in report.get("warnings", []):
        t.add_row(Text("warning", style="yellow"), Text(w))
    total = report["timings"].get("total_s", report["timings"].get("predict_s", 0.0))
    t.add_row("time", f"{total:.2f} s")
    if "outputs" in report:
        t.add_row("written", Text(report["outputs"]["folder"]))
    return t


def _short(d: dict[str, Any], limit: int = 3) -> str:
    items = [
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in list(d.items())[:limit]
        if isinstance(v, (int, float, str))
    ]
    return ", ".join(items)


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
        gray = np.clip((img[:, :, z] - lo) / (hi - lo), 0, 1)
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
    y = header + len(zs) * (ph + pad)
    bar = np.repeat(lut[np.linspace(0, 255, pw).astype(np.intp)][None], 10, axis=0)
    for c in range(2, 5):
        x = pad + c * (pw + pad)
        canvas.paste(Image.fromarray(bar, "RGB"), (x, y))
        draw.text((x, y + 12), "0", fill=(0, 0, 0), font=font)
        label = f"{top:.2f}"
        draw.text((x + pw - 6 * len(label), y + 12), label, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
