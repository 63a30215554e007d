"""Triton server URLs, health checks, and the errors a server can cause."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from uqserve.errors import UsageError
from uqserve.runtime.base import (
    RuntimeServiceError,
)

DEFAULT_GRPC_PORT = 8001
DEFAULT_TIMEOUT_S = 60.0  # per request: a 256 x 256 x 8 batch of a large bundle on a busy CPU
# The health check between attempts: a live server answers in milliseconds.
HEALTH_TIMEOUT_S = 5.0
# gRPC statuses worth retrying elsewhere; anything else is a bug or bad input.
_TRANSIENT = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
    "StatusCode.CANCELLED",
    "StatusCode.UNKNOWN",  # e.g. "Socket closed" when the server dies mid-call
}
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


class TritonUnavailableError(RuntimeServiceError):
    """No server answered in time (after retries and failover)."""


class TritonNotReadyError(TritonUnavailableError):
    """The server answers but does not have the bundle's models ready (yet)."""


class TritonMismatchError(RuntimeServiceError):
    """A server serves a different bundle than the local manifest."""


def parse_server(url: str) -> tuple[str, str]:
    """``grpc://host:port`` (or ``host:port``, ``host``) -> (display URL, ``host:port``)."""
    text = url.strip()
    if "://" not in text:
        text = f"grpc://{text}"
    parts = urlsplit(text)
    if parts.scheme != "grpc":
        raise UsageError(
            f"`servers`: {url!r} is not gRPC; write grpc://HOST:PORT (default port 8001)"
        )
    if not parts.hostname:
        raise UsageError(f"`servers`: {url!r} has no host; write grpc://HOST:PORT")
    try:
        port = parts.port or DEFAULT_GRPC_PORT
    except ValueError as exc:
        raise UsageError(
            f"`servers`: {url!r} has a bad port ({exc}); write grpc://HOST:PORT"
        ) from exc
    host = parts.hostname
    target_host = f"[{host}]" if ":" in host else host
    return f"grpc://{target_host}:{port}", f"{target_host}:{port}"


def any_server_live(urls: Sequence[str], timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether one of ``urls`` answers its gRPC liveness check within ``timeout_s``
    (a readiness probe's question; opens and closes its own clients)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    for url in urls:
        client = grpcclient.InferenceServerClient(parse_server(url)[1])
        try:
            if client.is_server_live(client_timeout=timeout_s):
                return True
        except InferenceServerException:
            continue
        finally:
            client.close()
    return False


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
