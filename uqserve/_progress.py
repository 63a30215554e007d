"""Progress callbacks: the library reports progress, the caller draws it.

Library functions that run long take a ``progress`` callback (default
``None``: silent) instead of drawing bars themselves; the CLI turns the
calls into rich progress bars (``uqserve.cli._common.ProgressBars``).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["LossProgressFn", "ProgressFn"]

ProgressFn = Callable[[str, int, int], None]
"""``progress(task, done, total)``, called after each step of ``task``.

``task`` is a display label (a scan name, ``"bundles"``, a bundle's set); a
label starting with spaces is a sub-task of the one before it.
"""

LossProgressFn = Callable[[str, int, int, float], None]
"""``progress(task, done, total, loss)``: training steps with the current loss."""
