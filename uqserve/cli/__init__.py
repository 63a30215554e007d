"""The ``uqserve`` command line: thin Typer commands over the Python API.

Each command lives in its own module here and registers itself on ``app``;
a command appears only once it is implemented. Command functions run long
only by their signatures (one annotated Typer option per flag, help text
included); their bodies stay short and call the library.
"""

from uqserve.cli._app import _App as _App
from uqserve.cli._app import app as app

# Command modules register themselves on import (keep this list sorted).
from uqserve.cli import _commands  # noqa: F401  # isort: skip
