"""``SidecarConfig``: everything ``uqserve sidecar`` is told, checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from uqserve.errors import UsageError
from uqserve.sidecar.dicomweb import WebAuth, WebPeer
from uqserve.sidecar.outputs import OutputOptions
from uqserve.sidecar.scp import SUPPORTED_MODALITIES, Limits
from uqserve.sidecar.sender import Peer
from uqserve.sidecar.tls import TLSConfig

__all__ = ["SidecarConfig"]


@dataclass(frozen=True)
class SidecarConfig:
    """Everything ``uqserve sidecar`` is told on its command line."""

    spool: Path
    ae_title: str = "UQSERVE"
    host: str = "0.0.0.0"
    port: int = 11112
    allow: tuple[str, ...] = ()
    # An empty ``allow`` accepts every caller only when this says so (fail closed).
    allow_any: bool = False
    send_to: Peer | WebPeer | None = None
    # Credentials of a DICOMweb ``send_to`` (read from the environment or a file).
    web_auth: WebAuth | None = None
    stable_seconds: float = 10.0
    modalities: tuple[str, ...] = SUPPORTED_MODALITIES
    outputs: OutputOptions = field(default_factory=OutputOptions)
    max_attempts: int = 5
    retry_base_s: float = 30.0
    send_retries: int = 3
    send_backoff_s: float = 2.0
    poll_s: float = 0.5
    limits: Limits = field(default_factory=Limits)
    # How long the instances of a finished series are kept, so that late ones
    # are merged with them and the series is processed whole (0: not kept).
    keep_s: float = 900.0
    # ``(host, port)`` of /healthz, /readyz and /metrics (None: not served).
    metrics: tuple[str, int] | None = None
    # DICOM TLS on the listener and the sender (and HTTPS trust for DICOMweb).
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        if not self.allow and not self.allow_any:
            raise UsageError(
                "no calling AE titles are allowed: give allow=(...) (--allow), "
                "or allow_any=True (--allow-any) to accept every caller"
            )
        if self.stable_seconds < 0:
            raise UsageError(f"stable_seconds must be >= 0, got {self.stable_seconds}")
        if self.keep_s < 0:
            raise ValueError(f"keep_s must be >= 0, got {self.keep_s}")
        if self.max_attempts < 1:
            raise UsageError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.port < 65536:
            raise UsageError(f"port {self.port} out of range 0-65535")
