"""A real Orthanc with its DICOMweb plugin (STOW-RS), and a recording HTTP relay.

* :class:`OrthancWeb`: Orthanc with Debian's ``orthanc-dicomweb`` plugin at
  ``/dicom-web``, optionally with HTTP basic auth and HTTPS (openssl-made
  certificates, :mod:`tests.tls_peers`).
* :class:`Relay`: a loopback HTTP(S) server that forwards every request to the
  Orthanc, keeps each request body, and can hold one answer back (the archive
  has stored it, the sender has not heard) so that a test kills the sender
  right then. It also terminates HTTPS for Orthanc: Debian's Orthanc 1.10
  segfaults (exit 139) on its first TLS connection with ``SslEnabled``.
"""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dicom_peers import Orthanc, free_port, require

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "uqsidecar", "s3cret-pw"


class OrthancWeb(Orthanc):
    """Orthanc serving DICOMweb at ``{url}/dicom-web``; ``auth``: basic auth required."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        auth: bool = False,
        lua: str | None = None,
    ) -> None:
        require("Orthanc")
        if not PLUGIN.exists():
            pytest.skip(
                "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
            )
        config: dict[str, Any] = {
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "AuthenticationEnabled": auth,
            "RegisteredUsers": {USER: PASSWORD} if auth else {},
        }
        super().__init__(workdir, lua=lua, config=config)
        self.auth = (USER, PASSWORD) if auth else None

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> Any:
        try:
            r = httpx.get(self.url + path, auth=self.auth, timeout=10)
        except httpx.HTTPError as exc:  # as urllib's: the start-up wait retries on OSError
            raise OSError(str(exc)) from exc
        if r.status_code >= 400:
            raise OSError(f"HTTP {r.status_code} for {path}")
        return r.json()

    def results(self, study_uid: str) -> list[dict[str, Any]]:
        """Simplified tags of every non-image instance of ``study_uid``."""
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            if (
                tags.get("Modality") not in ("CT", "MR")
                and tags.get("StudyInstanceUID") == study_uid
            ):
                out.append({**tags, "_id": iid})
        return out


def dicom_part(body: bytes) -> bytes:
    """The one application/dicom part of a STOW-RS request body."""
    start = body.index(b"\r\n\r\n") + 4
    end = body.rindex(b"\r\n--")
    return body[start:end]


class Relay:
    """``http://127.0.0.1:{port}`` forwarding to ``upstream``; keeps every request body.

    While ``hold`` is set, the answer to the second request is held after the
    upstream has answered it (stored, not confirmed) until ``release`` is set.
    """

    def __init__(self, upstream: str, *, hold: bool = True, tls: ssl.SSLContext | None = None):
        self.upstream = upstream
        self.bodies: list[bytes] = []
        self.answers: list[tuple[float, bytes, int]] = []  # (time, body, upstream status)
        self.authorizations: list[str | None] = []  # the Authorization header of each
        self.hold = hold
        self.second_stored = threading.Event()
        self.release = threading.Event()
        self.port = free_port()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                relay.bodies.append(body)
                relay.authorizations.append(self.headers.get("Authorization"))
                keep = ("Content-Type", "Accept", "Authorization")
                headers = {k: v for k in keep if (v := self.headers.get(k)) is not None}
                url = relay.upstream + self.path
                try:
                    r = httpx.post(url, content=body, headers=headers, timeout=30)
                except httpx.HTTPError:  # the archive is down
                    self.send_error(502)
                    return
                relay.answers.append((time.time(), body, r.status_code))
                if relay.hold and len(relay.bodies) == 2:
                    relay.second_stored.set()
                    relay.release.wait(60)
                try:
                    self.send_response(r.status_code)
                    self.send_header("Content-Type", r.headers.get("Content-Type", "text/plain"))
                    self.send_header("Content-Length", str(len(r.content)))
                    self.end_headers()
                    self.wfile.write(r.content)
                except OSError:
                    pass  # the sender was killed while its answer was held

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if tls is not None:  # HTTPS in front of the plain-HTTP Orthanc
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
