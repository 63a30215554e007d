"""One error family for the whole library.

Every error uqserve raises on purpose derives from :class:`UqserveError`:

- :class:`UsageError` (also a ``ValueError``): the caller can fix it — a bad
  input file, a bad bundle, a bad option value. Messages name the Python
  parameter (``out_dir``, ``overwrite``); the CLI maps them to its flags.
- :class:`ServiceError` (also a ``RuntimeError``): something outside the
  caller's input failed — a server, the network, a PACS peer.

Anything else that escapes is a bug, and the CLI shows its traceback.
"""

from __future__ import annotations

__all__ = ["ServiceError", "UqserveError", "UsageError"]


class UqserveError(Exception):
    """Base of every error uqserve raises on purpose."""


class UsageError(UqserveError, ValueError):
    """Bad input, bad bundle or bad option: fixable by the caller."""


class ServiceError(UqserveError, RuntimeError):
    """A server, network or PACS peer failed; retrying later may help."""
