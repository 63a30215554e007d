"""``uqserve train``: train the members of an AU x EU combination into a checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uqserve.cli._app import app
from uqserve.cli._common import console, fail, parse_numbers, progress_bars

# The TrainConfig field that --members sets, per EU method.
_MEMBERS_FIELD = {
    "none": "num_members",
    "ensemble": "num_members",
    "mcdropout": "num_masks",
    "swag": "swag_draws",
    "swagdiag": "swag_draws",
}
_DATA_HELP = (
    "`synthetic` (generated, default) or a folder DATA/<case>/image.nii.gz + "
    "DATA/<case>/label_<annotator>.nii.gz (.nii or 2D .png also work)."
)


@app.command("train")
def train_command(
    combination: Annotated[
        str,
        typer.Argument(help="AU-EU combination, e.g. softmax-ensemble, ssn-none, punet-mcdropout."),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Checkpoint folder to write.")],
    members: Annotated[
        int | None,
        typer.Option(
            "--members",
            "-m",
            min=1,
            help="Ensemble: networks to train (5). MC dropout: masks (10). SWAG: draws (10).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps per network.")] = 600,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Crops per step.")] = 8,
    size: Annotated[
        int, typer.Option(min=8, help="Square training crop = the bundle's tile size.")
    ] = 64,
    dims: Annotated[
        int,
        typer.Option(
            min=2,
            max=3,
            help="2: slices (default); 3: volumes (softmax, EU none/ensemble/mcdropout).",
        ),
    ] = 2,
    patch: Annotated[
        str,
        typer.Option(help="--dims 3: the training crop D,H,W = the bundle's window."),
    ] = "16,32,32",
    volumes: Annotated[int, typer.Option(min=1, help="--dims 3: synthetic training volumes.")] = 4,
    width: Annotated[int, typer.Option(min=4, help="UNet base width (multiple of 4).")] = 8,
    depth: Annotated[int, typer.Option(min=1, max=6, help="UNet levels.")] = 3,
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples", "-s", min=1, help="AU samples per member (default 1 softmax, else 10)."
        ),
    ] = None,
    classes: Annotated[int, typer.Option(min=2, help="Classes including background.")] = 2,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option(min=0, help="Member m is seeded seed + m.")] = 0,
    data: Annotated[str, typer.Option(help=_DATA_HELP)] = "synthetic",
    ambiguity: Annotated[
        str, typer.Option(help="Synthetic data: low or high annotator spread.")
    ] = "low",
    images: Annotated[int, typer.Option(min=1, help="Synthetic data: training slices.")] = 256,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads (default: half the CPUs).")
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where to train: cpu (default), cuda or cuda:N (a CUDA GPU).")
    ] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train checkpoints (config.json, member_<m>.safetensors) for `uqserve export`."""
    from uqserve.models import ModelConfig, parse_combination
    from uqserve.training import TrainConfig, train

    au, eu = parse_combination(combination)
    if eu == "none" and members not in (None, 1):
        fail(f"{combination} has exactly one member; drop --members {members}")
    if ambiguity not in ("low", "high"):
        fail(f"--ambiguity must be low or high, got {ambiguity!r}")
    num_samples = 1 if au == "softmax" else (samples or 10)
    if au == "softmax" and samples not in (None, 1):
        fail("softmax draws exactly one sample; drop --samples")
    model_config = ModelConfig(
        num_classes=classes, width=width, depth=depth, num_samples=num_samples, dims=dims
    )
    extra: dict[str, object] = {
        "patch": parse_numbers(patch, int, "--patch"),
        "num_volumes": volumes,
    }
    if members is not None:
        extra[_MEMBERS_FIELD[eu]] = members
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        size=(size, size),
        lr=lr,
        ambiguity=ambiguity,
        num_images=images,
        threads=threads,
        device=device,
        **extra,  # type: ignore[arg-type]
    )
    with progress_bars(not quiet, loss=True) as bars:
        path = train(
            combination,
            out,
            config=config,
            model_config=model_config,
            data=data,
            seed=seed,
            progress=bars,
            overwrite=overwrite,
        )
    import json

    cfg = json.loads((path / "config.json").read_text())
    dice = cfg.get("validation", {}).get("dice_vs_majority_mean")
    note = f"; Dice vs annotator majority {dice:.3f}" if dice is not None else ""
    console.print(
        f"wrote {path} ({cfg['num_members']} network(s){note}); "
        f"next: uqserve export --checkpoints {path} --out BUNDLE",
        highlight=False,
        soft_wrap=True,
    )
