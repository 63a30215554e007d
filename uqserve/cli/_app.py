"""The ``uqserve`` Typer app that every command module registers on.

Its own module so that the command modules import it without importing the
``uqserve.cli`` package that imports them (no import cycle).
"""

from __future__ import annotations

import inspect
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from uqserve._version import __version__
from uqserve.cli._common import one_line_errors

F = TypeVar("F", bound=Callable[..., Any])


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C: every ``with``/``finally`` cleans up."""


def summary(doc: str) -> str:
    """The first paragraph of a docstring as one line."""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _without_flag_types(params: list[Any]) -> list[Any]:
    """Flags take no value: no ``<bool>`` beside them in ``--help``."""
    for p in params:
        if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class _App(typer.Typer):
    """The ``uqserve`` script: SIGTERM is handled like SIGINT (Ctrl-C).

    Both unwind the command (temp folders removed, servers stopped) and exit
    with 128 + the signal number: 130 after SIGINT, 143 after SIGTERM.
    Commands that run until stopped (serve, sidecar) install their own handlers.
    Every command runs under ``one_line_errors``: uqserve's errors print one
    line, anything else is a bug and shows its traceback.
    """

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        def decorator(func: F) -> F:
            # The command list shows the docstring's whole first paragraph, never a
            # summary cut at 45 characters (click's default), mid-word or mid-`code`.
            kwargs.setdefault("short_help", summary(func.__doc__ or ""))
            kwargs.setdefault("cls", _Command)
            super(_App, self).command(*args, **kwargs)(one_line_errors(func))
            return func

        return decorator

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        received: list[int] = []

        def on_term(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut cleanup short
            raise _Terminated()

        def on_int(signum: int, frame: FrameType | None) -> None:
            received.append(signum)
            signal.default_int_handler(signum, frame)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            if received and exc.code not in (0, None):
                sys.exit(128 + received[0])  # click says "Aborted!" and exits 1; be precise
            raise


app = _App(
    name="uqserve",
    cls=_Group,
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
