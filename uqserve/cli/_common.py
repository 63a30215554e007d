"""Helpers shared by commands: one-line errors on stderr, consoles, common options."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

# Options that mean the same in several commands (predict, sidecar).
BundleOption = Annotated[
    str | None,
    typer.Option(
        "--bundle",
        "-b",
        help="Shipped bundle name or bundle folder.",
        show_default="softmax-ensemble",
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(help="Noise seed (default: the bundle's seed).", min=0, show_default=False),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line on stderr and exit non-zero."""
    # escape: messages carry brackets (e.g. `uqserve[server]`) that rich would eat as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
