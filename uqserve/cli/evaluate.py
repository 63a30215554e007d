"""``uqserve evaluate`` and ``uqserve calibrate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from uqserve.cli._app import app
from uqserve.cli._common import console, progress_bars

_DATA_HELP = (
    "`synthetic`, or a folder of images with per-annotator label maps "
    "(the format `uqserve train` reads)."
)


@app.command()
def evaluate(
    bundles: Annotated[
        list[str],
        typer.Argument(help="Bundle folders or shipped bundle names.", show_default=False),
    ],
    data: Annotated[str, typer.Option("--data", help=_DATA_HELP)] = "synthetic",
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (results.json/.csv/.md, figures/).")
    ] = Path("uqserve-eval"),
    server: Annotated[
        list[str] | None,
        typer.Option("--server", help="Triton gRPC URL (repeat for several); default: embedded."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Embedded runtime device: auto, cpu or cuda.")
    ] = "auto",
    aggregator: Annotated[
        str, typer.Option(help="Image-level aggregator of the tables (the paper's: border).")
    ] = "border",
    n_test: Annotated[int, typer.Option(help="Synthetic ID test images per ambiguity level.")] = 32,
    n_val: Annotated[
        int, typer.Option(help="Synthetic validation images (Platt fits, thresholds).")
    ] = 32,
    n_ood: Annotated[int, typer.Option(help="Images per OOD set (shift x severity).")] = 16,
    size: Annotated[
        int | None, typer.Option(help="Synthetic image size (default: the bundle's tile size).")
    ] = None,
    shift: Annotated[
        list[str] | None, typer.Option("--shift", help="OOD shift (repeat); default: all.")
    ] = None,
    severity: Annotated[
        list[float] | None, typer.Option("--severity", help="Shift severity in (0, 1] (repeat).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the data and of the run (added to each bundle's seed).")
    ] = 0,
    figures: Annotated[
        bool, typer.Option("--figures/--no-figures", help="Write PNG figures (needs matplotlib).")
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary rows as JSON instead of a table.")
    ] = False,
) -> None:
    """Evaluate bundles: downstream metrics, OOD detection and the entanglement scores Δ."""
    from uqserve.evaluate import evaluate as run_evaluate
    from uqserve.evaluate import markdown_table, summary_row

    with progress_bars(not quiet) as bars:
        results = run_evaluate(
            bundles,
            data,
            out,
            servers=server or None,
            device=device,
            aggregator=aggregator,
            n_test=n_test,
            n_val=n_val,
            n_ood=n_ood,
            size=None if size is None else (size, size),
            shifts=shift or None,
            severities=tuple(severity) if severity else (0.5, 1.0),
            seed=seed,
            figures=figures,
            overwrite=overwrite,
            progress=bars,
        )
    if as_json:
        typer.echo(json.dumps([summary_row(b) for b in results["bundles"]], indent=2))
        return
    typer.echo(markdown_table(results))
    console.print(
        f"results: {out}/results.json, results.csv, results.md" + (", figures/" if figures else "")
    )


@app.command()
def calibrate(
    bundle: Annotated[
        str, typer.Argument(help="Bundle folder to calibrate (its manifest is rewritten).")
    ],
    data: Annotated[str, typer.Option("--data", help=_DATA_HELP)] = "synthetic",
    server: Annotated[
        list[str] | None,
        typer.Option("--server", help="Triton gRPC URL (repeat for several); default: embedded."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Embedded runtime device: auto, cpu or cuda.")
    ] = "auto",
    n_test: Annotated[
        int, typer.Option(help="Synthetic calibration images per ambiguity level.")
    ] = 32,
    n_val: Annotated[
        int, typer.Option(help="Synthetic ID validation images (the OOD threshold).")
    ] = 32,
    n_ood: Annotated[int, typer.Option(help="Images per OOD set (shift x severity).")] = 16,
    size: Annotated[
        int | None, typer.Option(help="Synthetic image size (default: the bundle's tile size).")
    ] = None,
    quantile: Annotated[
        float, typer.Option(help="Quantile of ID validation EU that sets the OOD threshold.")
    ] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the data and of the run.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the new manifest's OOD and entanglement as JSON.")
    ] = False,
) -> None:
    """Pick the default aggregator and OOD threshold; record Δ in a new manifest version."""
    from uqserve.calibration import calibrate as run_calibrate

    with progress_bars(not quiet) as bars:
        man = run_calibrate(
            bundle,
            data,
            servers=server or None,
            device=device,
            n_test=n_test,
            n_val=n_val,
            n_ood=n_ood,
            size=None if size is None else (size, size),
            quantile=quantile,
            seed=seed,
            progress=bars,
        )
    facts = {
        "manifest_version": man.manifest_version,
        "default_aggregator": man.default_aggregator,
        "ood": {
            "aggregator": man.ood.aggregator,
            "threshold": man.ood.threshold,
            "quantile": man.ood.quantile,
        },
        "entanglement": man.entanglement,
    }
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    ent = man.entanglement

    def f(v: object) -> str:
        return "–" if v is None else f"{float(v):.3f}"  # type: ignore[arg-type]

    console.print(
        f"{man.name}: manifest v{man.manifest_version}; aggregator {man.default_aggregator}; "
        f"OOD threshold {f(man.ood.threshold)}; Δ OOD {f(ent.get('delta_ood'))}, "
        f"ambiguity {f(ent.get('delta_ambiguity'))}, "
        f"calibration {f(ent.get('delta_calibration'))}, "
        f"mean {f(ent.get('delta_mean'))} ({ent.get('convention')})",
        highlight=False,
    )
