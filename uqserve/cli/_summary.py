"""The terminal summary of one scan's report (rich)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from uqserve.cli._common import printable

__all__ = ["summary_table"]


def _fmt_ml(v: dict[str, Any]) -> str:
    lo, hi = v["ci95_ml"]
    return f"{v['mean_ml']:.2f} ± {v['std_ml']:.2f} mL  [95 %: {lo:.2f}–{hi:.2f}]"


def _num(x: Any, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary_table(report: Mapping[str, Any]) -> Table:
    """A short two-column rich table of one scan's report."""
    scan, bundle, scores = report["scan"], report["bundle"], report["scores"]
    title = Text(f"uqserve predict · {printable(scan['name'])}")
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    shape = "x".join(str(s) for s in scan["shape"])
    spacing = "x".join(f"{s:g}" for s in scan["spacing"])
    t.add_row("scan", f"{shape} voxels, {spacing} mm")
    t.add_row(
        "bundle",
        Text(
            f"{printable(bundle['name'])} ({bundle['au']}-{bundle['eu']}, M={bundle['members']}, "
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
        t.add_row(Text("warning", style="yellow"), Text(printable(w)))
    total = report["timings"].get("total_s", report["timings"].get("predict_s", 0.0))
    t.add_row("time", f"{total:.2f} s")
    if "outputs" in report:
        t.add_row("written", Text(printable(report["outputs"]["folder"])))
    return t


def _short(d: dict[str, Any], limit: int = 3) -> str:
    items = [
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in list(d.items())[:limit]
        if isinstance(v, (int, float, str))
    ]
    return ", ".join(items)
