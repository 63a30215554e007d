"""The sidecar's log formats: human-readable text (default) or one JSON object a line.

``--log-format json`` writes, per record::

    {"time": "2026-12-07T23:10:42.123Z", "level": "info", "logger": "uqserve.sidecar",
     "event": "series 3f2a... delivered: 8 slices, 5 result(s) in 2.1 s",
     "series": "3f2a...", "duration_s": 2.1}

``series`` is the spool key (a hash of the Series Instance UID, as in the text
format), taken from the record or its message; ``duration_s`` is present where
the sidecar timed something. The text is the same scrubbed message as in the
text format (:mod:`uqserve.sidecar._privacy` has already withheld library
messages); an exception is named by its type only, never its text.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SERIES = re.compile(r"\bseries ([0-9a-f]{16})\b")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ms), level, logger, event, series, duration_s."""

    def format(self, record: logging.LogRecord) -> str:
        event = record.getMessage()
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
        }
        series = getattr(record, "series", None)
        if series is None and (m := _SERIES.search(event)):
            series = m.group(1)
        if series is not None:
            out["series"] = str(series)
        duration = getattr(record, "duration_s", None)
        if isinstance(duration, (int, float)):
            out["duration_s"] = round(float(duration), 3)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = record.exc_info[0].__name__  # its text may quote values
        return json.dumps(out, ensure_ascii=False)


def configure_logging(log_format: str = "text", *, verbose: bool = False) -> None:
    """Root logging for the sidecar process: ``text`` or ``json`` lines on stderr."""
    if log_format not in LOG_FORMATS:
        from uqserve.errors import UsageError

        raise UsageError(f"--log-format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
