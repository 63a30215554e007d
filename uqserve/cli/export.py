"""``uqserve export`` (recipe, checkpoints or your own ONNX -> bundle) and ``uqserve info``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uqserve.cli._app import app
from uqserve.cli._common import console, err_console, fail, parse_numbers

if TYPE_CHECKING:
    from uqserve.bundle import Normalization, Padding


@app.command("export")
def export_command(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="With --onnx: your ONNX members, one file each.", show_default=False),
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="The bundle folder to write.")] = Path(
        "bundle"
    ),
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", help="Train and export a recipe (export/*.toml).", show_default=False
        ),
    ] = None,
    checkpoints: Annotated[
        Path | None,
        typer.Option(
            "--checkpoints", help="Export a folder written by `uqserve train`.", show_default=False
        ),
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Wrap your own ONNX graphs [B,C,H,W] -> [B,K,H,W].")
    ] = False,
    nnunet: Annotated[
        Path | None,
        typer.Option(
            "--nnunet",
            help="Export an nnU-Net v2 trained model folder (<trainer>__<plans>__<configuration>).",
            show_default=False,
        ),
    ] = None,
    folds: Annotated[
        str | None,
        typer.Option(help="With --nnunet: folds to export, e.g. 0,1,2,3,4 (default: all found)."),
    ] = None,
    checkpoint: Annotated[
        str, typer.Option(help="With --nnunet: the checkpoint file name in each fold folder.")
    ] = "checkpoint_final.pth",
    mirror: Annotated[
        bool,
        typer.Option(help="With --nnunet: bake nnU-Net's test-time mirroring into each member."),
    ] = False,
    au: Annotated[str, typer.Option(help="With --onnx: the AU method (softmax).")] = "softmax",
    outputs: Annotated[
        str, typer.Option(help="With --onnx: the graphs return `logits` or `probs`.")
    ] = "logits",
    classes: Annotated[
        str | None,
        typer.Option(
            help="Class names, background first, e.g. background,lesion.", show_default=False
        ),
    ] = None,
    tile: Annotated[int | None, typer.Option(help="Tile size (pixels, square).", min=8)] = None,
    multiple: Annotated[
        int, typer.Option(help="With --onnx: H, W must be multiples of this.")
    ] = 16,
    norm_mean: Annotated[
        float, typer.Option("--norm-mean", help="With --onnx: intensity mean.")
    ] = 0.0,
    norm_std: Annotated[
        float, typer.Option("--norm-std", help="With --onnx: intensity std.")
    ] = 1.0,
    norm: Annotated[
        str,
        typer.Option(
            "--norm",
            help="With --onnx: fixed (mean/std), zscore (per scan) or ct (clip, mean/std).",
        ),
    ] = "fixed",
    norm_clip: Annotated[
        str | None,
        typer.Option(
            "--norm-clip", help="With --onnx: LOW,HIGH clip before normalising (ct: required)."
        ),
    ] = None,
    nonzero: Annotated[
        bool, typer.Option("--nonzero", help="With --onnx --norm zscore: inside the nonzero mask.")
    ] = False,
    dims: Annotated[
        int, typer.Option("--dims", help="With --onnx: 2 (slices) or 3 ([B,C,D,H,W] graphs).")
    ] = 2,
    patch: Annotated[
        str | None,
        typer.Option("--patch", help="With --onnx: the window, H,W or D,H,W (3D: required)."),
    ] = None,
    spacing: Annotated[
        str | None,
        typer.Option("--spacing", help="With --onnx: model voxel size in mm, Y,X or Z,Y,X."),
    ] = None,
    orientation: Annotated[
        str | None, typer.Option("--orientation", help="With --onnx: axis codes, e.g. RAS.")
    ] = None,
    interpolation: Annotated[
        str, typer.Option("--interpolation", help="With --onnx: image resampling, cubic|linear.")
    ] = "cubic",
    pad: Annotated[
        str,
        typer.Option(
            "--pad",
            help="With --onnx: pad scans smaller than the window by `reflect`ion, or "
            "`constant` 0 centred (nnU-Net's).",
        ),
    ] = "reflect",
    members: Annotated[
        int | None,
        typer.Option(
            "--members",
            "-m",
            help="Members (MC dropout: masks; SWAG: weight draws; ensemble: first M).",
            min=1,
        ),
    ] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", "-s", help="AU samples per member.", min=1)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="The bundle's noise seed.", min=0)] = None,
    name: Annotated[str | None, typer.Option(help="Bundle name (default: folder name).")] = None,
    calibrate: Annotated[
        bool, typer.Option("--calibrate/--no-calibrate", help="Calibrate the OOD threshold.")
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
    exporter: Annotated[
        str, typer.Option(help="torch exporter: torchscript (fast) or dynamo.")
    ] = "torchscript",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Export a bundle from a recipe, `uqserve train` checkpoints, your own ONNX files,
    or an nnU-Net v2 model folder."""
    from uqserve.calibration import calibrate_bundle
    from uqserve.contracts import default_class_names
    from uqserve.exporting import (
        export_checkpoints,
        export_nnunet,
        export_onnx_members,
        export_recipe,
    )

    _check_route(files, recipe=recipe, checkpoints=checkpoints, onnx=onnx, nnunet=nnunet)
    names = [c.strip() for c in classes.split(",")] if classes else None
    calibrator = calibrate_bundle if calibrate else None  # exporting never imports calibration

    def say(msg: str) -> None:
        if not quiet and not json_out:
            err_console.print(msg, style="dim", highlight=False)

    if recipe is not None:
        bundle = export_recipe(recipe, out, overwrite=overwrite, calibrate=calibrator, progress=say)
    elif nnunet is not None:
        bundle = export_nnunet(
            nnunet,
            out,
            folds=[f.strip() for f in folds.split(",")] if folds else None,
            checkpoint=checkpoint,
            mirror=mirror,
            name=name,
            overwrite=overwrite,
            progress=say,
        )
    elif checkpoints is not None:
        bundle = export_checkpoints(
            checkpoints,
            out,
            num_members=members,
            num_samples=samples,
            seed=seed,
            name=name,
            classes=names,
            tile_size=(tile, tile) if tile else None,
            calibrate=calibrator,
            overwrite=overwrite,
            exporter=exporter,
            progress=say,
        )
    else:
        if not files:
            fail("--onnx needs one or more ONNX files (one per member)")
        if dims == 3 and calibrate:
            say("3D members: not calibrated (calibration draws synthetic 2D slices)")
        bundle = export_onnx_members(
            files,
            out,
            au=au,
            outputs=outputs,
            classes=names or default_class_names(2),
            normalization=_normalization(norm, norm_mean, norm_std, nonzero, norm_clip),
            tile_size=(tile or 128, tile or 128),
            multiple=multiple,
            dims=dims,
            patch=parse_numbers(patch, int, "--patch"),
            spacing=parse_numbers(spacing, float, "--spacing"),
            orientation=orientation,
            interpolation=interpolation,
            pad=_padding(pad),
            name=name,
            seed=seed or 0,
            calibrate=calibrator if dims == 2 else None,
            overwrite=overwrite,
        )
    _print_result(bundle, quiet=quiet, json_out=json_out)


def _normalization(
    scheme: str, mean: float, std: float, nonzero: bool, norm_clip: str | None
) -> Normalization:
    """``--norm*`` as the manifest's ``input.normalization``."""
    from uqserve.bundle import Normalization

    clip = parse_numbers(norm_clip, float, "--norm-clip")
    if clip is not None and len(clip) != 2:
        fail(f"--norm-clip: give LOW,HIGH, got {norm_clip!r}")
    return Normalization(
        scheme=scheme, mean=mean, std=std, nonzero=nonzero,
        clip=None if clip is None else (clip[0], clip[1]),
    )  # fmt: skip


def _padding(pad: str) -> Padding:
    """``--pad`` as the manifest's ``input.pad``."""
    from uqserve.bundle import Padding

    if pad == "reflect":
        return Padding()
    if pad == "constant":
        return Padding(mode="constant", value=0.0, centre=True)
    fail(f"--pad: choose reflect or constant, got {pad!r}")


def _check_route(
    files: list[Path] | None,
    *,
    recipe: Path | None,
    checkpoints: Path | None,
    onnx: bool,
    nnunet: Path | None,
) -> None:
    """Exactly one of the four sources of a bundle; FILES only with ``--onnx``."""
    routes = [on for on in (recipe, checkpoints, onnx, nnunet) if on]
    if len(routes) != 1:
        fail("give exactly one of --recipe TOML, --checkpoints DIR, --onnx FILE... or --nnunet DIR")
    if files and not onnx:
        fail(f"unexpected arguments {' '.join(map(str, files))}; ONNX files need --onnx")


def _print_result(bundle: Any, *, quiet: bool, json_out: bool) -> None:
    """The manifest as JSON (``--json``), or one line on what was written and how to go on."""
    if json_out:
        typer.echo(json.dumps(_info_dict(bundle), indent=2))
    elif not quiet and not bundle.manifest.validation:
        m = bundle.manifest
        cmd = f"uqserve calibrate {bundle.path} --data DIR"
        how = f"calibrate it on your own validation cases: {cmd}"
        console.print(
            f"wrote {bundle.path} ({m.combination}, M={m.num_members}), not calibrated "
            f"(no OOD threshold); {how}",
            highlight=False,
            soft_wrap=True,
        )
    elif not quiet:
        m = bundle.manifest
        console.print(
            f"wrote {bundle.path} ({m.combination}, M={m.num_members}, S={m.num_samples}, "
            f"default aggregator {m.default_aggregator}, OOD threshold {m.ood.threshold})",
            highlight=False,
        )


def _info_dict(bundle: Any) -> dict[str, Any]:
    d: dict[str, Any] = bundle.manifest.to_dict()
    d["path"] = str(bundle.path)
    return d


def _format(value: Any) -> str:
    """One table cell: numbers to 4 significant digits, dicts as ``key value`` pairs."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_format(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list | tuple):
        return ", ".join(_format(v) for v in value) or "–"
    return "–" if value is None or value == "" else str(value)


def _section_rows(section: str, values: dict[str, Any]) -> list[tuple[str, str]]:
    """Every key of ``manifest.validation`` or ``manifest.entanglement``, one row each."""
    return [(f"{section}.{k}", _format(v)) for k, v in values.items()]


@app.command("info")
def info_command(
    bundle: Annotated[
        str, typer.Argument(help="A shipped bundle's name or a bundle folder.")
    ] = "softmax-ensemble",
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Check every member's sha256.")
    ] = True,
) -> None:
    """Show a bundle's manifest: combination, members, samples, classes, OOD threshold."""
    from rich.table import Table

    from uqserve.bundle import load_bundle

    b = load_bundle(bundle, verify=verify)
    if json_out:
        typer.echo(json.dumps(_info_dict(b), indent=2))
        return
    m = b.manifest
    t = Table(title=f"bundle {m.name}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    norm = m.input.normalization
    rows = [
        ("path", str(b.path)),
        ("combination", f"{m.au} (AU) x {m.eu} (EU)"),
        ("members (M)", str(m.num_members)),
        ("samples per member (S)", str(m.num_samples)),
        ("classes", ", ".join(m.classes)),
        (
            "input",
            f"{m.input.channels} channel(s), tile {m.input.tile_size[0]}x{m.input.tile_size[1]}, "
            f"multiple of {m.input.multiple}",
        ),
        ("geometry", _geometry_text(m.input)),
        (
            "normalization",
            f"{norm.scheme} mean={norm.mean:.4g} std={norm.std:.4g}"
            + (f" clip={norm.clip}" if norm.clip else "")
            + (" inside the nonzero mask" if norm.nonzero else ""),
        ),
        ("seed", str(m.seed)),
        ("default aggregator", m.default_aggregator),
        (
            "OOD",
            f"image EU ({m.ood.aggregator}) > {m.ood.threshold} "
            f"(q={m.ood.quantile}, {len(m.ood.validation_scores)} ID scores)",
        ),
        ("opset / uqserve", f"{m.opset} / {m.uqserve_version}"),
        ("created", m.created),
        ("checksums", "verified" if verify else "not checked"),
    ]
    rows += _section_rows("validation", m.validation)
    rows += _section_rows("entanglement", m.entanglement)
    for k, v in rows:
        t.add_row(k, v)
    for i, mem in enumerate(m.members):
        t.add_row(f"member {i}", f"{mem.file}  sha256 {mem.sha256[:16]}…")
    console.print(t)


def _geometry_text(inp: Any) -> str:
    """``2D slices, patch 64x64, spacing 0.8x0.8 mm, RAS, cubic`` (the manifest's geometry)."""
    parts = ["2D slices" if inp.dims == 2 else "3D volumes"]
    parts.append("whole slices" if inp.patch is None else "patch " + "x".join(map(str, inp.patch)))
    parts.append(
        "the scan's spacing"
        if inp.spacing is None
        else "spacing " + "x".join(f"{v:g}" for v in inp.spacing) + " mm"
    )
    parts.append("as stored" if inp.orientation is None else inp.orientation)
    if inp.spacing is not None:
        parts.append(inp.interpolation)
    return ", ".join(parts)
