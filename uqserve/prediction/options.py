"""Checks of predict's options, before any work starts."""

from __future__ import annotations

from uqserve.bundle import Manifest
from uqserve.errors import UsageError

__all__ = [
    "PredictError",
    "check_batch_size",
    "check_channels",
    "check_on_error",
    "check_overlap",
    "resolve_seed",
]


class PredictError(UsageError):
    """Inputs to predict that cannot be used (options, shapes, runtime outputs)."""


def check_batch_size(batch_size: int | None) -> None:
    """``batch_size`` is ``None`` (the runtime's choice) or an integer >= 1."""
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise PredictError(
            f"batch_size must be an integer >= 1 or None (the runtime's choice), got {batch_size}"
        )


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise PredictError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def resolve_seed(seed: int | None, man: Manifest) -> int:
    """The noise seed: ``seed``, or the bundle's when ``None``; must fit an int64."""
    if seed is None:
        seed = man.seed
    if not 0 <= int(seed) < 2**63:
        raise PredictError(f"seed must be in 0..2^63-1, got {seed}")
    return int(seed)


def check_channels(man: Manifest) -> None:
    """predict reads single-channel scans; a multi-channel bundle cannot be fed."""
    if man.input.channels != 1:
        raise PredictError(
            f"bundle {man.name} expects {man.input.channels} channels; "
            "uqserve predict reads single-channel scans"
        )


def check_overlap(overlap: float) -> None:
    """``overlap``: the fraction of a window its neighbour shares, 0 <= overlap < 1."""
    if isinstance(overlap, bool) or not 0.0 <= float(overlap) < 1.0:
        raise PredictError(f"overlap must be a fraction in [0, 1), got {overlap!r}")
