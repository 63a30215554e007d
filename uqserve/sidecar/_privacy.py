"""Keep tag values out of the sidecar's logs.

DICOM libraries quote the values they complain about: highdicom warns about a
one-component PatientName *with the name*, pydicom logs ``Invalid value for VR
UI: '<the UID>'``, and exception texts repeat dates and sexes. The sidecar
therefore never prints a foreign message:

* Python warnings are routed into logging as category + source module + a
  fixed text (:func:`guard_logs` replaces ``warnings.showwarning``);
* records of pydicom, highdicom and pynetdicom lose their text when they are
  created (a log record factory), whichever handler then sees them; those
  loggers stop propagating and hand each record to a scrubber that re-logs
  logger name + level + source line once on ``uqserve.sidecar``;
* exceptions are described by :func:`describe` (type + fixed text, or the
  system's text for an errno), except uqserve's own errors, whose messages are
  written never to quote tag values.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from uqserve.errors import UqserveError
from uqserve.volumes import VolumeError

__all__ = ["LIBRARIES", "describe", "guard_logs", "traceback_lines"]

log = logging.getLogger("uqserve.sidecar")

LIBRARIES = ("pydicom", "highdicom", "pynetdicom")
_WITHHELD = "text withheld: library messages may quote tag values"
_lock = threading.Lock()
_installed = False


class _Scrubber(logging.Handler):
    """Re-log a library record as ``logger level`` + fixed text, once per source line."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._seen: set[tuple[str, str, int]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        where = (record.name, record.pathname, record.lineno)
        if where in self._seen:  # the text is withheld, so repeats say nothing new
            return
        self._seen.add(where)
        log.log(
            record.levelno,
            "%s %s at %s:%d (%s)",
            record.name,
            record.levelname.lower(),
            Path(record.pathname).name,
            record.lineno,
            _WITHHELD,
        )


def _scrubbing_factory(base: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(
        name: str, level: int, fn: str, lno: int, msg: object, args: Any, *rest: Any, **kw: Any
    ) -> logging.LogRecord:
        if name.split(".", 1)[0] in LIBRARIES:
            msg, args = _WITHHELD, ()
            rest = (None, *rest[1:]) if rest else rest  # exc_info: its text may quote values
        return base(name, level, fn, lno, msg, args, *rest, **kw)

    return make


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    module = Path(filename).parent.name + "/" + Path(filename).name
    log.warning("%s from %s:%d (%s)", category.__name__, module, lineno, _WITHHELD)


def guard_logs() -> None:
    """Install the warning hook and the library scrubbers (idempotent, process-wide).

    Library loggers also stay at WARNING: pynetdicom's INFO/DEBUG summaries list
    UIDs, and nothing below a warning is worth a line without its text.
    """
    global _installed
    with _lock:
        if _installed:
            return
        warnings.showwarning = _show_warning
        logging.setLogRecordFactory(_scrubbing_factory(logging.getLogRecordFactory()))
        scrubber = _Scrubber()
        for name in LIBRARIES:
            lib = logging.getLogger(name)
            lib.setLevel(logging.WARNING)
            lib.propagate = False
            for handler in list(lib.handlers):  # e.g. pynetdicom's own NullHandler
                lib.removeHandler(handler)
            lib.addHandler(scrubber)
        _installed = True


def describe(exc: BaseException) -> str:
    """A log-safe description of ``exc``: our own message, or only the type.

    An ``OSError`` with an errno (itself or its cause: pydicom re-raises without
    one) adds the system's text for it (``No space left on device``): a fixed
    table, never a file name or a value.
    """
    if isinstance(exc, (UqserveError, VolumeError)):
        return str(exc)
    code = _errno_of(exc)
    if code is not None:
        return f"{type(exc).__name__} ({os.strerror(code)})"
    return f"{type(exc).__name__} ({_WITHHELD})"


def _errno_of(exc: BaseException | None, depth: int = 0) -> int | None:
    """The errno of the first ``OSError`` in ``exc``'s chain of causes, or None."""
    if exc is None or depth > 8:
        return None
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int) and code in errno.errorcode:
        return code
    return _errno_of(exc.__cause__ or exc.__context__, depth + 1)


def traceback_lines(tb: TracebackType | None) -> str:
    """Where an exception came from (file:line in function), without any values."""
    import traceback

    return "; ".join(
        f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in traceback.extract_tb(tb)[-6:]
    )
