"""``uqserve predict``: segment scans with TU/AU/EU maps and a report."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uqserve.cli._app import app
from uqserve.cli._common import (
    BundleOption,
    SeedOption,
    cli_message,
    console,
    err_console,
    error_line,
    fail,
    printable,
)

if TYPE_CHECKING:
    from uqserve.prediction import ScanResult


@app.command("predict")
def predict_command(
    scans: Annotated[
        list[Path],
        typer.Argument(
            help="NIfTI files (.nii, .nii.gz), folders of NIfTI files, or folders holding one "
            "DICOM series.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Results go to OUT/<scan name>/.")
    ] = Path("uqserve-out"),
    bundle: BundleOption = None,
    seed: SeedOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Slices per inference call (default: 1 on a CPU, 8 on a GPU or Triton).",
            min=1,
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        float,
        typer.Option(
            "--overlap",
            help="Share of the window neighbouring sliding windows overlap (bundles with a patch).",
            min=0.0,
            max=0.95,
        ),
    ] = 0.5,
    device: Annotated[
        str, typer.Option(help="Where the embedded runtime runs: auto, cpu or cuda.")
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="GPU arithmetic: fp32 (exact, the default), tf32 or fp16 (faster; the maps "
            "change by up to about 1e-3). Needs --device cuda or a GPU found by auto.",
        ),
    ] = "fp32",
    reduce: Annotated[
        str | None,
        typer.Option(
            "--reduce",
            help="Where the members' outputs are summed: graph (the reduction graph, on the "
            "GPU with CUDA: only the sums come back) or host. Default: graph on CUDA.",
            show_default=False,
        ),
    ] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="Same as --precision tf32.", show_default=False)
    ] = False,
    server: Annotated[
        list[str] | None,
        typer.Option(
            "--server",
            help="Triton server URL (host:port); repeat for several. Default: run in-process.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds to wait for each server request.", min=0.001),
    ] = 60.0,
    deadline: Annotated[
        float | None,
        typer.Option(
            "--deadline",
            help="Seconds a scan may take on the servers, retries included (default: no limit).",
            min=0.001,
            show_default=False,
        ),
    ] = None,
    volume_index: Annotated[
        int | None,
        typer.Option("--volume-index", help="Pick this volume (0-based) of a 4D NIfTI.", min=0),
    ] = None,
    max_voxels: Annotated[
        int | None,
        typer.Option(
            "--max-voxels",
            help="Refuse scans with more voxels (default: $UQSERVE_MAX_VOXELS or 268435456).",
            min=1,
            show_default=False,
        ),
    ] = None,
    png: Annotated[bool, typer.Option("--png", help="Also write preview.png.")] = False,
    compression_level: Annotated[
        int,
        typer.Option(
            "--compression-level",
            help="gzip level of the .nii.gz maps: 1 (fast) to 9 (smallest, slowest); 1-3 use "
            "the fast multi-threaded ISA-L compressor. 0 writes plain .nii maps (no gzip).",
            min=0,
            max=9,
        ),
    ] = 1,
    exact_scores: Annotated[
        bool,
        typer.Option(
            "--exact-scores",
            help="Rank every voxel for the scan's AU~EU entanglement (default: a seeded sample "
            "of 2^22 of them on bigger scans; the report gives its standard error).",
            show_default=False,
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print each report as one JSON line instead of a table.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No table, no progress bar.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing results in OUT/<scan name>/.")
    ] = False,
) -> None:
    """Segment scans and write seg, prob, TU/AU/EU maps and report.json per scan.

    A bad scan is reported in one line and skipped; the exit code is 1 if any
    scan failed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from uqserve.bundle import load_bundle
    from uqserve.cli._summary import summary_table
    from uqserve.prediction import Predictor, RuntimeOptions, collect_scans

    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device!r}: use auto, cpu or cuda")
    if precision not in ("fp32", "tf32", "fp16"):
        fail(f"--precision {precision!r}: use fp32, tf32 or fp16")
    if reduce not in (None, "graph", "host"):
        fail(f"--reduce {reduce!r}: use graph or host")
    if fast:
        if precision not in ("fp32", "tf32"):
            fail(f"--fast means --precision tf32; it contradicts --precision {precision}")
        precision = "tf32"
    paths = collect_scans(scans)
    options = RuntimeOptions(
        device=device, precision=precision, servers=tuple(server or ()), timeout_s=timeout,
        deadline_s=deadline, reduce=reduce or "auto",
    )  # fmt: skip
    predictor = Predictor(
        load_bundle(bundle), options, seed=seed, batch_size=batch_size, overlap=overlap,
        exact_scores=exact_scores,
    )  # fmt: skip
    predictor.open()  # a missing GPU or a server that is down: one line, before any bar

    failed: list[ScanResult] = []
    # No bar when stderr is no terminal (a log file, a pipe): it would only add blank lines.
    show_progress = not (quiet or json_out) and err_console.is_terminal
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
        disable=not show_progress,
    )
    scans_task = progress.add_task("scans", total=len(paths))
    slices_task = progress.add_task("slices", total=None)

    def on_slices(name: str, done: int, total: int) -> None:
        progress.update(
            slices_task, description=f"  {printable(name)}", completed=done, total=total
        )

    def on_scan(res: ScanResult) -> None:
        progress.advance(scans_task)
        if not res.ok:
            failed.append(res)
            message = cli_message(res.error or "")
            progress.console.print(error_line(message), highlight=False, soft_wrap=True)
            return
        report: Mapping[str, Any] = res.report or {}
        if json_out:
            typer.echo(json.dumps(report))
        elif not quiet:
            console.print(summary_table(report))

    with progress, predictor:
        predictor.predict_files(
            paths,
            out,
            png=png,
            compression_level=compression_level,
            overwrite=overwrite,
            volume_index=volume_index,
            max_voxels=max_voxels,
            on_error="skip",
            progress=on_slices if show_progress else None,
            on_scan=on_scan,
        )
    if failed:
        fail(f"{len(failed)} of {len(paths)} scans failed; see the lines above", code=1)
    if not (quiet or json_out):
        console.print(f"results in {printable(str(out))}/", highlight=False)
