"""STOW-RS client: deliver result files to a DICOMweb archive (``--send-to http(s)://...``).

Same contract as the C-STORE sender (:func:`uqserve.sidecar.sender.send_files`):
each file is stored at most once per success, ``on_sent(path)`` is called as
soon as the archive confirms it, a refusal is permanent (``SendResult.refused``,
the file goes to dead-letter/) and anything else is worth another try.

One instance per request (``multipart/related; type="application/dicom"``),
so each confirmation or refusal is about exactly one file. The archive's
answer decides:

* 200/202 with the instance in the Referenced SOP Sequence: stored;
* the instance in the Failed SOP Sequence, or 400, 409, 413, 415: refused;
* 401/403 (credentials), 404 (wrong URL), 408, 429, 5xx, no answer, a TLS
  failure: not stored, retried (the operator can fix these and the results wait).

Credentials never come from the command line (they would show in ``ps``):
:meth:`WebAuth.load` reads ``Bearer <token>`` or ``Basic <user>:<password>``
from an environment variable or a file, again before each delivery so a
rotated secret is picked up. HTTPS peers are always verified.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom

from uqserve.errors import UsageError
from uqserve.sidecar.sender import SendResult

__all__ = ["AUTH_ENV", "WebAuth", "WebPeer", "stow_files"]

log = logging.getLogger("uqserve.sidecar")

AUTH_ENV = "UQSERVE_DICOMWEB_AUTH"
_REFUSED = {400, 409, 413, 415}
_REFERENCED, _FAILED = "00081199", "00081198"
_SOP_INSTANCE, _FAILURE_REASON = "00081155", "00081197"


@dataclass(frozen=True)
class WebPeer:
    """A DICOMweb service root, e.g. ``https://pacs.example.org/dicom-web``."""

    url: str

    @classmethod
    def parse(cls, text: str) -> WebPeer:
        parts = urlsplit(text.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"DICOMweb address {text!r}: expected http(s)://HOST:PORT/PATH, "
                "e.g. https://pacs.example.org/dicom-web"
            )
        if parts.username or parts.password:
            raise UsageError(
                "DICOMweb address: remove the credentials from the URL (they would show in "
                f"`ps`); put them in ${AUTH_ENV} or an auth file"
            )
        if parts.query or parts.fragment:
            raise UsageError(f"DICOMweb address {text!r}: no ?query or #fragment, only the root")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise UsageError(f"DICOMweb address {text!r}: bad port") from exc
        return cls(text.strip().rstrip("/"))

    @property
    def stow_url(self) -> str:
        return f"{self.url}/studies"

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class WebAuth:
    """Where the ``Authorization`` header comes from: an environment variable or a file.

    The value is ``Bearer <token>`` or ``Basic <user>:<password>``; the secret
    is never stored on this object, logged or shown in its repr.
    """

    env: str | None = None
    file: Path | None = None

    @classmethod
    def load(cls, file: str | Path | None = None, env: str = AUTH_ENV) -> WebAuth | None:
        """``file`` if given, else ``$env`` if set, else no credentials; checked now."""
        if file is not None:
            if os.environ.get(env):
                raise UsageError(f"DICOMweb credentials in both ${env} and {file}: keep one")
            auth = cls(file=Path(file))
        elif os.environ.get(env):
            auth = cls(env=env)
        else:
            return None
        auth.header()
        return auth

    def _raw(self) -> str:
        if self.file is not None:
            try:
                return self.file.read_text().strip()
            except OSError as exc:
                raise UsageError(
                    f"DICOMweb auth file {self.file}: cannot read it ({exc.strerror})"
                ) from exc
        return os.environ.get(self.env or AUTH_ENV, "").strip()

    def header(self) -> str:
        """The ``Authorization`` header value, read from the source now."""
        where = f"auth file {self.file}" if self.file is not None else f"${self.env}"
        scheme, _, secret = self._raw().partition(" ")
        secret = secret.strip()
        if scheme.lower() == "bearer" and secret:
            return f"Bearer {secret}"
        if scheme.lower() == "basic" and ":" in secret:
            return "Basic " + base64.b64encode(secret.encode()).decode()
        raise UsageError(
            f"DICOMweb credentials in {where}: expected 'Bearer <token>' or "
            "'Basic <user>:<password>' (one line)"
        )


@dataclass
class _Answer:
    stored: bool
    refused: bool
    reason: str


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    while boundary.encode() in data:  # practically never: 128 random bits
        boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _uids(sequence: Any) -> dict[str, str]:
    """SOP Instance UID -> failure reason ('' when none) of a DICOM JSON sequence."""
    out: dict[str, str] = {}
    items = sequence.get("Value", []) if isinstance(sequence, dict) else []
    for item in items if isinstance(items, list) else []:
        uid = (item.get(_SOP_INSTANCE, {}).get("Value") or [None])[0]
        reason = (item.get(_FAILURE_REASON, {}).get("Value") or [""])[0]
        if isinstance(uid, str):
            out[uid] = f"0x{reason:04X}" if isinstance(reason, int) else str(reason)
    return out


def _judge(status: int, body: Any, uid: str) -> _Answer:
    """What the archive's answer to one instance means (see the module docstring)."""
    body = body if isinstance(body, dict) else {}
    failed = _uids(body.get(_FAILED))
    if uid in failed:
        return _Answer(False, True, f"refused by the archive (HTTP {status}, reason {failed[uid]})")
    if status in (200, 202) and uid in _uids(body.get(_REFERENCED)):
        return _Answer(True, False, "")
    if status in _REFUSED:
        return _Answer(False, True, f"refused by the archive (HTTP {status})")
    if status in (401, 403):
        why = "credentials refused: check the token or password"
    elif status == 404:
        why = "no STOW-RS service there: check the --send-to path"
    elif status in (200, 202):
        why = "the archive did not confirm this instance"
    else:
        why = "archive busy or failing"
    return _Answer(False, False, f"HTTP {status}, {why}")


@dataclass
class _Attempt:
    """One pass over the pending files on one HTTP connection."""

    peer: WebPeer
    headers: dict[str, str]
    client: Any
    result: SendResult
    reasons: dict[Path, str]
    on_sent: Callable[[Path], None] | None
    still: list[Path] = field(default_factory=list)

    def send(self, f: Path, uid: str) -> bool:
        """POST one file; False when the archive cannot be reached (stop this pass)."""
        import httpx

        body, content_type = _multipart(f.read_bytes())
        try:
            r = self.client.post(
                self.peer.stow_url,
                content=body,
                headers={**self.headers, "Content-Type": content_type},
            )
        except httpx.HTTPError as exc:  # refused, reset, timeout, TLS verification
            self.reasons[f] = f"not sent: {type(exc).__name__} ({self.peer})"
            self.result.refused.discard(f)
            return False
        try:
            payload = r.json() if r.content else {}
        except ValueError:
            payload = {}
        answer = _judge(r.status_code, payload, uid)
        if answer.stored:
            self.result.sent.append(f)
            self.result.refused.discard(f)
            if self.on_sent is not None:
                self.on_sent(f)
            return True
        self.reasons[f] = answer.reason
        if answer.refused:
            self.result.refused.add(f)
        else:
            self.result.refused.discard(f)
        self.still.append(f)
        return True


def stow_files(
    files: Sequence[str | os.PathLike[str]],
    peer: WebPeer,
    *,
    auth: WebAuth | None = None,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    sleep: Callable[[float], object] = time.sleep,
    on_sent: Callable[[Path], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> SendResult:
    """STOW-RS ``files`` to ``peer``, one request per file, retrying what failed.

    Up to ``retries`` more passes over what is left (waiting ``backoff_s *
    2**attempt``); refused files are retried too (an archive may refuse while
    it is being reconfigured) and end in ``SendResult.refused``. ``tls``: the
    verifying client context (default: the system's CAs).
    """
    import httpx

    from uqserve.sidecar.tls import client_context

    pending = [Path(f) for f in files]
    uids = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pending}
    result, reasons = SendResult(), dict[Path, str]()
    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            sleep(backoff_s * 2 ** (attempt - 1))
        headers = {"Accept": "application/dicom+json"}
        if auth is not None:
            headers["Authorization"] = auth.header()
        verify = tls if tls is not None else client_context()
        with httpx.Client(timeout=timeout_s, verify=verify) as client:
            step = _Attempt(peer, headers, client, result, reasons, on_sent)
            for i, f in enumerate(pending):
                if not step.send(f, uids[f]):
                    step.still.extend(pending[i:])
                    for rest in pending[i + 1 :]:
                        reasons[rest] = reasons[f]
                        result.refused.discard(rest)
                    break
        if step.still:
            log.warning(
                "STOW-RS to %s: %d of %d not stored (%s; attempt %d of %d)",
                peer, len(step.still), len(pending), reasons[step.still[0]],
                attempt + 1, retries + 1,
            )  # fmt: skip
        pending = step.still
    result.failed = {f: reasons[f] for f in pending}
    result.refused &= set(pending)
    return result
