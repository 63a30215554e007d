"""Named points where a process can be made to stop itself, for kill and race tests.

``UQSERVE_STOP_AT=commit`` (a comma-separated list of names) makes the process
send itself SIGSTOP when it reaches that point; a test then waits for the stop
(``waitpid(..., WUNTRACED)``), acts (kills it, runs a rival) and resumes or
kills it. Deterministic, no sleeps. Unset, ``reached`` is one dict lookup.

Points: ``read`` (input read), ``written`` (outputs complete in the temp
folder), ``commit`` (holding the commit lock, before the rename),
``server-started`` (tritonserver launched, not yet ready).
"""

from __future__ import annotations

import os
import signal

ENV = "UQSERVE_STOP_AT"


def reached(point: str) -> None:
    """Stop this process (SIGSTOP) if ``point`` is listed in ``$UQSERVE_STOP_AT``."""
    names = os.environ.get(ENV)
    if names and point in names.split(","):
        os.kill(os.getpid(), signal.SIGSTOP)
