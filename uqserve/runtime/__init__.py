"""Client-side runtimes: embedded (onnxruntime) and triton (tritonclient)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from uqserve.bundle import Bundle, load_bundle
from uqserve.runtime.base import Batch, MemberOutputs, ReducedOutputs, Runtime, RuntimeServiceError

__all__ = [
    "Batch",
    "MemberOutputs",
    "ReducedOutputs",
    "Runtime",
    "RuntimeServiceError",
    "open_runtime",
]


def open_runtime(
    bundle: Bundle | str | os.PathLike[str] | None = None,
    servers: Sequence[str] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    *,
    timeout_s: float | None = None,
    deadline_s: float | None = None,
    reduce: str = "auto",
) -> Runtime:
    """The runtime for ``bundle``: Triton when ``servers`` are given, else embedded.

    ``bundle`` is a loaded ``Bundle``, a shipped bundle's name or a folder
    (``None``: the default bundle). ``servers`` are Triton URLs
    (``host:port`` gRPC); the Triton runtime checks that the served model
    matches the manifest. ``device`` and ``precision`` (``fp32``, ``tf32``,
    ``fp16``; see ``uqserve.runtime.embedded``) apply to the embedded runtime;
    a server's precision is set by its repository. ``timeout_s`` (per request,
    default 60 s) and ``deadline_s`` (per scan, retries included; default none)
    apply to servers (see ``TritonRuntime``). ``reduce`` (``auto``, ``graph``,
    ``host``; see ``EmbeddedRuntime``) applies to the embedded runtime.
    Raises ``BundleError`` for a bad bundle, ``RuntimeServiceError`` when a server
    cannot be used.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if servers:
        if precision != "fp32":
            from uqserve.errors import UsageError

            raise UsageError(
                f"precision {precision!r} applies to the embedded runtime; a Triton server "
                "runs its repository's graphs as written (drop precision or servers)"
            )
        try:
            from uqserve.runtime.triton import DEFAULT_TIMEOUT_S, TritonRuntime
        except ImportError as exc:
            raise RuntimeServiceError(
                f"the Triton runtime is not available in this install ({exc}); "
                "run without `servers` to predict in-process"
            ) from exc
        try:
            return TritonRuntime(
                bundle,
                list(servers),
                timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
                deadline_s=deadline_s,
            )
        except RuntimeServiceError:
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise RuntimeServiceError(
                f"cannot connect to {', '.join(servers)} ({exc}); check that `uqserve serve` "
                "runs there, or drop `servers` to predict in-process"
            ) from exc
    from uqserve.runtime.embedded import EmbeddedRuntime

    return EmbeddedRuntime(bundle, device=device, precision=precision, reduce=reduce)
