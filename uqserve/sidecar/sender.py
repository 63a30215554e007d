"""C-STORE SCU: send result files to a PACS, with retries and a dead-letter folder."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from uqserve._fs import atomic_write_text
from uqserve.errors import UsageError

__all__ = ["Peer", "SendResult", "dead_letter", "parse_address", "send_files"]

log = logging.getLogger("uqserve.sidecar")

# Success (0x0000) and the warnings that still mean "stored" (PS3.4 Annex B.2.3).
_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 chars, no backslash or control


def check_ae_title(title: str, what: str = "AE title") -> str:
    """Return ``title`` stripped, or raise UsageError naming the rule it breaks."""
    t = title.strip()
    if not _AE_RE.match(t):
        raise UsageError(f"{what} {title!r}: 1 to 16 printable ASCII characters, no backslash")
    return t


def parse_address(text: str, default_port: int = 104) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``, or ``HOST``) -> (host, port)."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?(?::(\d+))?", text.strip())
    if not m or not m.group(1):
        raise UsageError(f"address {text!r}: expected HOST:PORT, e.g. 0.0.0.0:11112")
    port = int(m.group(2)) if m.group(2) else default_port
    if not 0 < port < 65536:
        raise UsageError(f"address {text!r}: port must be 1-65535")
    return m.group(1), port


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity to send to: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        if "@" not in text:
            raise UsageError(f"peer {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@pacs.local:4242")
        ae, addr = text.split("@", 1)
        host, port = parse_address(addr)
        return cls(check_ae_title(ae, "peer AE title"), host, port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class SendResult:
    """Which files were stored by the peer, and why the others were not."""

    sent: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    # Those of ``failed`` the peer answered with a failure status (it will not
    # take them); the others could not be sent (peer unreachable, aborted, or
    # out of resources, 0xA7xx: worth another try later).
    refused: set[Path] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.failed


def send_files(
    files: Sequence[str | os.PathLike[str]],
    peer: Peer,
    *,
    calling_ae: str = "UQSERVE",
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    sleep: Callable[[float], object] = time.sleep,
    on_sent: Callable[[Path], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> SendResult:
    """C-STORE ``files`` to ``peer`` in one association per attempt.

    A file the peer refuses with a failure status, or that cannot be sent
    because the association fails, is retried up to ``retries`` more times
    (waiting ``backoff_s * 2**attempt``); what still failed is in
    ``SendResult.failed`` with the last reason. ``on_sent(path)`` is called as
    soon as the peer has stored ``path`` (so a crash later does not resend it).
    ``tls`` (a client context, :mod:`uqserve.sidecar.tls`): DICOM TLS, the peer's
    certificate verified for ``peer.host``.
    """
    pending = [Path(f) for f in files]
    result = SendResult()
    reasons: dict[Path, str] = {}
    sop_classes = sorted(
        {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in pending}
    )
    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            sleep(backoff_s * 2 ** (attempt - 1))
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        ae.connection_timeout = timeout_s
        for uid in sop_classes:
            ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls_args = (tls, peer.host) if tls is not None else None
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            why = (
                "association rejected"
                if assoc.is_rejected
                else "association aborted or peer unreachable"
            )
            for f in pending:
                reasons[f] = f"{why} ({peer}) after {attempt + 1} attempt(s)"
                result.refused.discard(f)
            log.warning(
                "send to %s failed: %s (attempt %d of %d)", peer, why, attempt + 1, retries + 1
            )
            continue
        still: list[Path] = []
        try:
            for f in pending:
                try:
                    status = assoc.send_c_store(f)
                except (ValueError, RuntimeError) as exc:  # no accepted context, association lost
                    reasons[f] = f"not sent: {type(exc).__name__}: {exc}"
                    if isinstance(exc, ValueError):  # the peer accepted no context for it
                        result.refused.add(f)
                    still.append(f)
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in _OK_STATUSES:
                    result.sent.append(f)
                    result.refused.discard(f)
                    if on_sent is not None:
                        on_sent(f)
                else:
                    if code >= 0 and code & 0xFF00 != 0xA700:  # out of resources: try later
                        result.refused.add(f)
                    reasons[f] = (
                        "no response (timeout or abort)"
                        if code < 0
                        else f"peer status 0x{code:04X}"
                    )
                    still.append(f)
        finally:
            if assoc.is_established:
                assoc.release()
        pending = still
    result.failed = {f: reasons[f] for f in pending}
    result.refused &= set(pending)
    return result


def dead_letter(files: dict[Path, str], folder: str | os.PathLike[str]) -> list[Path]:
    """Move unsendable files into ``folder`` with ``<name>.reason.json`` beside each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for src, reason in files.items():
        dst = folder / src.name
        shutil.move(str(src), dst)
        atomic_write_text(
            folder / f"{src.name}.reason.json",
            json.dumps({"file": src.name, "reason": reason, "time": time.time()}, indent=2),
        )
        moved.append(dst)
    return moved
