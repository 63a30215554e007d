"""The DICOM Storage SCP: receive instances and spool them before acknowledging."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from uqserve.errors import UsageError
from uqserve.sidecar.spool import Spool, series_key

__all__ = ["SUPPORTED_MODALITIES", "Limits", "StorageSCP"]

log = logging.getLogger("uqserve.sidecar")

SUPPORTED_MODALITIES = ("CT", "MR")

# C-STORE statuses (PS3.4 B.2.3)
_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700
_DATASET_MISMATCH = 0xA900
_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Limits:
    """How long the SCP waits for a peer, and how many associations it serves at once.

    acse_s     wait for the A-ASSOCIATE request after a TCP connect (and for a
               release): an idle socket holds a slot at most this long
    dimse_s    wait for the next DIMSE message inside an association
    network_s  close an association on which nothing at all arrives for this long
    max_associations  concurrent associations; more are rejected (transient,
               "local limit exceeded") and the sender should retry
    """

    acse_s: float = 10.0
    dimse_s: float = 30.0
    network_s: float = 60.0
    max_associations: int = 32

    def __post_init__(self) -> None:
        for name in ("acse_s", "dimse_s", "network_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_associations < 1:
            raise UsageError(f"max_associations must be >= 1, got {self.max_associations}")


class StorageSCP:
    """A Storage SCP on ``(host, port)`` that writes every accepted instance to ``spool``.

    ``allow``: calling AE titles accepted (others get an association reject);
    empty accepts any. The called AE title must be ``ae_title``. ``limits``
    bound how long idle peers hold a slot and how many are served at once.
    Every storage SOP class is negotiated so a PACS that pushes a whole study
    is not refused; instances whose Modality is not in ``modalities`` are not
    spooled: ``on_unsupported(series_key, reason)`` is called instead and the
    store is acknowledged (received, deliberately not processed).
    ``on_store(series_key)`` is called after each durable store.
    ``ssl_context`` (:meth:`uqserve.sidecar.tls.TLSConfig.server_context`)
    makes it a DICOM TLS listener.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        ae_title: str,
        host: str = "0.0.0.0",
        port: int = 11112,
        allow: Sequence[str] = (),
        modalities: Sequence[str] = SUPPORTED_MODALITIES,
        on_store: Callable[[str], None] | None = None,
        on_unsupported: Callable[[str, str], None] | None = None,
        limits: Limits = Limits(),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.spool = spool
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.allow = tuple(a.strip() for a in allow if a.strip())
        self.modalities = tuple(m.upper() for m in modalities)
        self.on_store = on_store
        self.on_unsupported = on_unsupported
        self._server: ThreadedAssociationServer | None = None
        self.limits = limits
        self.ssl_context = ssl_context  # DICOM TLS: a plain association then fails
        self._ae = AE(ae_title=ae_title)
        self._ae.acse_timeout = limits.acse_s  # also the ARTIM timer: idle sockets are dropped
        self._ae.dimse_timeout = limits.dimse_s
        self._ae.network_timeout = limits.network_s
        self._ae.maximum_associations = limits.max_associations
        self._ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                self._ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification)
        if self.allow:
            self._ae.require_calling_aet = list(self.allow)

    def start(self) -> None:
        """Start listening in background threads; returns once the socket is bound."""
        server = self._ae.start_server(
            (self.host, self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_REJECTED, self._handle_rejected),
                (evt.EVT_ACCEPTED, self._handle_accepted),
            ],
        )
        assert server is not None  # block=False returns the server
        self._server = server
        self.port = int(server.server_address[1])
        self.spool.listening()  # start-up time does not count towards --stable-seconds
        log.info(
            "listening on %s:%d%s as %s (calling AEs allowed: %s; at most %d associations, "
            "idle connections closed after %g s)",
            self.host,
            self.port,
            " with TLS" if self.ssl_context is not None else "",
            self.ae_title,
            ", ".join(self.allow) or "any",
            self.limits.max_associations,
            self.limits.acse_s,
        )

    def stop(self) -> None:
        """Stop listening; associations in progress are closed."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _handle_accepted(self, event: Any) -> None:
        log.debug("association from %s accepted", event.assoc.requestor.ae_title)

    def _handle_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "association from calling AE %r at %s rejected: %s",
            requestor.ae_title,
            requestor.address,
            self._reject_reason(event.assoc),
        )

    def _reject_reason(self, assoc: Any) -> str:
        """Why pynetdicom rejected ``assoc`` (the same checks, in its order of precedence)."""
        active = [a for a in self._ae.active_associations if a.is_acceptor]
        if len(active) > self.limits.max_associations:
            return (
                f"association limit reached ({self.limits.max_associations} in progress; "
                "raise max_associations or find idle peers)"
            )
        primitive = getattr(assoc.requestor, "primitive", None)
        called = str(getattr(primitive, "called_ae_title", "")).strip()
        if called != self.ae_title.strip():
            return f"called AE title {called!r} is not this node's {self.ae_title!r}"
        if self.allow and str(assoc.requestor.ae_title).strip() not in self.allow:
            return "calling AE title not in the allowed list"
        return "association negotiation failed"

    def _handle_store(self, event: Any) -> int:
        calling = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            series_uid = str(ds.SeriesInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
            modality = str(getattr(ds, "Modality", "")).upper()
        except AttributeError:
            log.warning("instance from %s rejected: no Series/SOP Instance UID", calling)
            return _DATASET_MISMATCH
        except Exception as exc:  # undecodable data set
            log.warning(
                "instance from %s rejected: cannot decode (%s)", calling, type(exc).__name__
            )
            return _CANNOT_UNDERSTAND
        key = series_key(series_uid)
        if modality not in self.modalities:
            reason = (
                f"unsupported modality {modality or 'none'!r} "
                f"(SOP class {getattr(getattr(ds, 'SOPClassUID', None), 'name', '?')}); "
                f"the sidecar processes {', '.join(self.modalities)} series"
            )
            if self.on_unsupported is not None:
                self.on_unsupported(key, reason)
            return _SUCCESS
        try:
            self.spool.store(series_uid, sop_uid, event.encoded_dataset(include_meta=True))
        except OSError as exc:
            log.error("cannot spool an instance of series %s: %s", key, exc.strerror)
            return _OUT_OF_RESOURCES
        log.debug("spooled an instance of series %s from %s", key, calling)
        if self.on_store is not None:
            self.on_store(key)
        return _SUCCESS
