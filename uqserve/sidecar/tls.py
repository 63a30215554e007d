"""TLS for the sidecar: DICOM TLS on the listener and the sender, HTTPS for DICOMweb.

One identity and one trust anchor serve every connection:

* ``cert``/``key`` (PEM): this node's certificate and private key. The listener
  presents them to senders; the C-STORE and STOW-RS clients present them when
  the peer asks for a client certificate (mutual TLS).
* ``ca`` (PEM, one or more certificates): the hospital CA. When given, the
  listener requires every sender to present a certificate it signed (mutual
  TLS), and the clients verify the receiving peer against it; without it the
  listener asks for no client certificate and the clients verify peers against
  the system's trusted CAs. Peers are always verified: there is no switch to
  turn verification off.

TLS 1.2 is the oldest version either side speaks.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from uqserve.errors import UsageError

__all__ = ["MINIMUM_VERSION", "TLSConfig"]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _readable(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; give a PEM file")
    try:
        path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror})") from exc
    return path


@dataclass(frozen=True)
class TLSConfig:
    """Where this node's certificate, key and trusted CA are (PEM files).

    Built with :meth:`from_files`, which loads them once so that a wrong file is
    refused before the sidecar listens.
    """

    cert: Path
    key: Path
    ca: Path | None = None

    @classmethod
    def from_files(
        cls,
        cert: str | Path | None,
        key: str | Path | None,
        ca: str | Path | None = None,
    ) -> TLSConfig | None:
        """The TLS settings, or ``None`` when neither ``cert`` nor ``key`` is given.

        Raises UsageError naming the flag when one of the pair is missing or a
        file is not a readable PEM certificate/key/CA.
        """
        if cert is None and key is None:
            if ca is not None:
                raise UsageError("--tls-ca needs --tls-cert and --tls-key (this node's identity)")
            return None
        if cert is None or key is None:
            raise UsageError("--tls-cert and --tls-key go together: give both PEM files")
        config = cls(
            _readable(Path(cert), "--tls-cert"),
            _readable(Path(key), "--tls-key"),
            _readable(Path(ca), "--tls-ca") if ca is not None else None,
        )
        config.server_context()  # load everything now: a bad file fails at start
        config.client_context()
        return config

    def _load_identity(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise UsageError(
                f"--tls-cert {self.cert} / --tls-key {self.key}: not a PEM certificate and "
                f"its matching unencrypted private key ({exc.reason or 'unreadable'})"
            ) from exc

    def _load_ca(self, ctx: ssl.SSLContext) -> None:
        assert self.ca is not None
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except ssl.SSLError as exc:
            raise UsageError(
                f"--tls-ca {self.ca}: not a PEM CA certificate ({exc.reason or 'unreadable'})"
            ) from exc

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: this node's identity; senders verified against ``ca``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MINIMUM_VERSION
        self._load_identity(ctx)
        if self.ca is not None:
            self._load_ca(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The senders' context: the peer verified (``ca`` or the system CAs), host name
        checked, this node's certificate offered for mutual TLS."""
        ctx = client_context(self.ca)
        self._load_identity(ctx)
        return ctx


def client_context(ca: Path | None = None) -> ssl.SSLContext:
    """A verifying client context (TLS >= 1.2): against ``ca``, else the system's CAs."""
    # With ``ca`` only the hospital CA is trusted, not the system's as well.
    ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    ctx.minimum_version = MINIMUM_VERSION
    return ctx
