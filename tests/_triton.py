"""Marks for tests that start the real tritonserver (skipped without the server extra)."""

from __future__ import annotations

import pytest

from uqserve.serving import ServerError, find_server_tree

try:
    find_server_tree()
    HAVE_SERVER = True
except ServerError:
    HAVE_SERVER = False

TRITON_MARKS = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAVE_SERVER, reason="tritonserver (server extra) is not installed"),
]
