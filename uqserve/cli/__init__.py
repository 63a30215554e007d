"""The ``uqserve`` command line: thin Typer commands over the Python API.

Each command lives in its own module here and registers itself on ``app``;
a command appears only once it is implemented.
"""

from __future__ import annotations

from typing import Annotated

import typer

from uqserve import __version__

app = typer.Typer(
    name="uqserve",
    help="Segmentation with total, aleatoric and epistemic uncertainty: export, serve, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uqserve {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """uqserve: where, how sure, and why unsure."""


# Command modules register themselves on import (keep this list sorted).
from uqserve.cli import _commands  # noqa: E402,F401
