"""What the client checks: a batch against the bundle, a served model against the manifest."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from uqserve.bundle import Bundle
from uqserve.errors import UsageError
from uqserve.runtime.base import (
    Batch,
)


def _check_batch(batch: Batch, bundle: Bundle) -> None:
    image = batch.image
    dims = bundle.manifest.input.dims
    if image.ndim != dims + 2:
        form = "[B, C, H, W]" if dims == 2 else "[B, C, D, H, W]"
        raise UsageError(f"batch.image must be {form}, got shape {image.shape}")
    b, c = image.shape[:2]
    if c != bundle.manifest.input.channels:
        raise UsageError(
            f"batch.image has {c} channels but bundle {bundle.manifest.name!r} expects "
            f"{bundle.manifest.input.channels}"
        )
    for name, arr, shape in (
        ("seed", batch.seed, (b,)),
        ("offset", batch.offset, (b, 3)),
        ("valid", batch.valid, (b, dims)),
    ):
        if tuple(np.shape(arr)) != shape:
            raise UsageError(
                f"batch.{name} must have shape {list(shape)}, got {list(np.shape(arr))}"
            )


def _describe_mismatch(local: dict[str, Any], served: dict[str, Any] | None) -> str:
    if served is None:
        return "the server's model has no uqserve_manifest parameter: not written by uqserve"
    problems = []
    for key in ("name", "manifest_version", "num_members", "num_samples", "classes"):
        if served.get(key) != local.get(key):
            problems.append(f"{key}: served {served.get(key)!r}, local {local.get(key)!r}")
    if not problems and served.get("members") != local.get("members"):
        differ = [
            i
            for i, (a, b) in enumerate(
                itertools.zip_longest(served.get("members") or [], local.get("members") or [])
            )
            if a != b
        ]
        problems.append(f"member checksums differ for member(s) {differ}")
    return "; ".join(problems)
