"""Helpers shared by commands: one-line errors on stderr, consoles, common options."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

# No markup anywhere: file names, bundle names and server messages are user text, and
# `[bold]x.nii.gz` or `a[/]b` must print as written. Style with `style=` or `Text` only.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

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
    typer.Option(
        help="Noise seed (default: the bundle's seed).", min=0, max=2**63 - 1, show_default=False
    ),
]


def error_line(message: str) -> Text:
    """``error: MESSAGE`` with a red label and the message as plain text."""
    return Text.assemble(("error:", "bold red"), " ", message)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line on stderr and exit non-zero."""
    err_console.print(error_line(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)
