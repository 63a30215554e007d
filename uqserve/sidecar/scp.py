"""The DICOM Storage SCP: receive instances and spool them before acknowledging."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from uqserve.sidecar.spool import Spool, series_key

__all__ = ["SUPPORTED_MODALITIES", "StorageSCP"]

log = logging.getLogger("uqserve.sidecar")

SUPPORTED_MODALITIES = ("CT", "MR")

# C-STORE statuses (PS3.4 B.2.3)
_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700
_DATASET_MISMATCH = 0xA900
_CANNOT_UNDERSTAND = 0xC000


def quiet_libraries() -> None:
    """Keep libraries that log UIDs at INFO/DEBUG (pynetdicom's DIMSE summaries,
    highdicom's attribute copying) to warnings: logs must not identify patients."""
    for name in ("pynetdicom", "highdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


class StorageSCP:
    """A Storage SCP on ``(host, port)`` that writes every accepted instance to ``spool``.

    ``allow``: calling AE titles accepted (others get an association reject);
    empty accepts any. Every storage SOP class is negotiated so a PACS that
    pushes a whole study is not refused; instances whose Modality is not in
    ``modalities`` are not spooled: ``on_unsupported(series_key, reason)`` is
    called instead and the store is acknowledged (received, deliberately not
    processed). ``on_store(series_key)`` is called after each durable store.
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
        self._ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                self._ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification)
        if self.allow:
            self._ae.require_calling_aet = list(self.allow)
        quiet_libraries()

    def start(self) -> None:
        """Start listening in background threads; returns once the socket is bound."""
        server = self._ae.start_server(
            (self.host, self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._handle_store),
                (evt.EVT_REJECTED, self._handle_rejected),
                (evt.EVT_ACCEPTED, self._handle_accepted),
            ],
        )
        assert server is not None  # block=False returns the server
        self._server = server
        self.port = int(server.server_address[1])
        log.info(
            "listening on %s:%d as %s (calling AEs allowed: %s)",
            self.host,
            self.port,
            self.ae_title,
            ", ".join(self.allow) or "any",
        )

    def stop(self) -> None:
        """Stop listening; associations in progress are closed."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _handle_accepted(self, event: Any) -> None:
        log.debug("association from %s accepted", event.assoc.requestor.ae_title)

    def _handle_rejected(self, event: Any) -> None:
        log.warning(
            "association from calling AE %r at %s rejected (not in --allow)",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )

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
