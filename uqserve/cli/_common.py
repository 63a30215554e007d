"""Helpers shared by commands: one-line errors on stderr, consoles, common options."""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.segment import Segment
from rich.text import Text

from uqserve._version import __version__
from uqserve.errors import UqserveError

# Control characters: C0, DEL, C1 and the bidi marks and overrides that reorder a line.
_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_CONTROL_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{_BIDI}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character escaped (``ESC`` -> ``\\x1b``, newline -> ``\\x0a``).

    File names are user text: an ``ESC ] 0 ;`` in one would retitle the terminal,
    a newline would forge a second line. Printed text is safe; the name is still
    recognisable.
    """
    return _CONTROL.sub(_escape, text)


class SafeConsole(Console):
    """A rich console that never writes a control character from the text it prints.

    Strings are escaped before layout (``render_str``: prints, table cells; all
    but newlines, which a traceback needs); the rendered segments are escaped
    again as a net for ``Text`` built elsewhere.
    rich's own styles and cursor moves are not text and pass unchanged.
    """

    def render_str(self, text: str, **kwargs: Any) -> Text:
        # Newlines stay: a traceback is several lines. Names go through printable().
        return super().render_str(_CONTROL_BUT_NEWLINE.sub(_escape, text), **kwargs)

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        safe = (
            seg if seg.control else Segment(_CONTROL_BUT_NEWLINE.sub(_escape, seg.text), seg.style)
            for seg in buffer
        )
        return super()._render_buffer(safe)


# No markup anywhere: file names, bundle names and server messages are user text, and
# `[bold]x.nii.gz` or `a[/]b` must print as written. Style with `style=` or `Text` only.
console = SafeConsole(markup=False)
err_console = SafeConsole(stderr=True, markup=False)

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


def _seed_in_range(value: int | None) -> int | None:
    """A usage error (exit 2) for a seed outside the graphs' int64, checked before any file."""
    if value is not None and not 0 <= value < 2**63:
        raise typer.BadParameter(f"{value} is not in 0..2^63-1")
    return value


# The range is checked by a callback, not min/max: --help would print 2^63 - 1 in full.
SeedOption = Annotated[
    int | None,
    typer.Option(
        help="Noise seed, 0 to 2^63-1 (default: the bundle's seed).",
        callback=_seed_in_range,
        show_default=False,
    ),
]


def error_line(message: str) -> Text:
    """``error: MESSAGE`` with a red label and the message as plain, printable text."""
    return Text.assemble(("error:", "bold red"), " ", printable(message))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line on stderr and exit non-zero."""
    err_console.print(error_line(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# Library messages name Python parameters in backticks (`overwrite=True`, `out_dir`);
# the command line shows the flag that sets them instead.
PARAMETER_FLAGS = {
    "au": "--au",
    "classes": "--classes",
    "data": "--data",
    "device": "--device",
    "figures": "--figures",
    "grpc_port": "--grpc-port",
    "http_port": "--http-port",
    "lr": "--lr",
    "metrics_port": "--metrics-port",
    "num_classes": "--classes",
    "out_dir": "--out",
    "outputs": "--outputs",
    "overwrite": "--overwrite",
    "servers": "--server",
    "volume_index": "--volume-index",
}
_PARAMETER = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]*))?`")
QUOTES = "\"'"
BUG_EXIT_CODE = 70  # EX_SOFTWARE: an internal error, not the user's input


def cli_message(message: str) -> str:
    """``message`` with each backticked Python parameter the CLI has a flag for as that flag.

    `` `out_dir` `` -> ``--out``, `` `overwrite=True` `` -> ``--overwrite``,
    `` `figures=False` `` -> ``--no-figures``, `` `device="cpu"` `` -> ``--device cpu``.
    Other backticked text (`` `uqserve serve` ``) stays as written.
    """

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        option = PARAMETER_FLAGS.get(name)
        if option is None:
            return m.group(0)
        if value is None or value == "True":
            return option
        if value == "False":
            return "--no-" + option.removeprefix("--")
        return f"{option} {value.strip(QUOTES)}"

    return _PARAMETER.sub(flag, message)


F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(command: F) -> F:
    """Run a command: a ``UqserveError`` (or an ``OSError``) prints one error line, exit 1.

    Anything else is a bug in uqserve: its traceback is shown, with one line
    asking to report it, and the exit code is 70.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer.Exit from fail(), Ctrl-C, bad options: Typer reports them
        except UqserveError as exc:
            fail(cli_message(str(exc)))
        except OSError as exc:  # the system refused (disk full, permissions): not a bug
            fail(str(exc))
        except Exception:
            err_console.print(traceback.format_exc(), highlight=False, soft_wrap=True, end="")
            err_console.print(error_line(bug_line()), highlight=False, soft_wrap=True)
            raise typer.Exit(BUG_EXIT_CODE) from None

    return run  # type: ignore[return-value]


def bug_line() -> str:
    return (
        f"this is a bug in uqserve {__version__}, not a problem with your input; please "
        "report it with the traceback above"
    )


class ProgressBars:
    """Rich progress bars on stderr, drawn from the library's progress callbacks.

    Pass an instance as ``progress=``: it is a ``ProgressFn``
    (``task, done, total``) and a ``LossProgressFn`` (``..., loss``). One bar
    per task label, created on its first call; sub-tasks (labels starting with
    a space) are removed once complete.
    """

    def __init__(self, *, loss: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[ProgressColumn] = [
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
        ]
        if loss:
            columns += [TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn()]
            columns.append(TimeRemainingColumn())
        else:
            columns.append(TimeElapsedColumn())
        self._progress = Progress(*columns, console=err_console)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressBars:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def __call__(self, task: str, done: int, total: int, loss: float = float("nan")) -> None:
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(printable(task), total=total, loss=loss)
        self._progress.update(self._tasks[task], completed=done, total=total, loss=loss)
        if task.startswith(" ") and done >= total:
            self._progress.remove_task(self._tasks.pop(task))


@contextmanager
def progress_bars(enabled: bool, *, loss: bool = False) -> Iterator[ProgressBars | None]:
    """``ProgressBars`` while the block runs, or ``None`` (no progress) when not ``enabled``."""
    if not enabled:
        yield None
        return
    with ProgressBars(loss=loss) as bars:
        yield bars


def parse_numbers(text: str | None, typ: type, flag: str) -> list[Any] | None:
    """``"1,2,3"`` -> ``[1, 2, 3]`` of ``typ``; None stays None."""
    if text is None:
        return None
    try:
        return [typ(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        fail(f"{flag}: expected comma-separated numbers, e.g. 64,128,128; got {text!r}")
