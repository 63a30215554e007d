"""Certificates made with the real ``openssl`` command, and dcmtk's TLS tools.

:func:`make_pki` writes a hospital-like PKI into a folder: a CA, a server
certificate for ``localhost``/``127.0.0.1``, a client certificate (both signed
by the CA) and a client certificate from another, untrusted CA.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.dicom_peers import require


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by a CA nobody trusts
    rogue_key: Path
    server_pem: Path  # server certificate + key in one file (Orthanc's SslCertificate)


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def _ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN=uqserve test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign",
        cwd=folder,
    )  # fmt: skip


def _leaf(folder: Path, name: str, ca: str, usage: str) -> None:
    (folder / f"{name}.ext").write_text(
        f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", "/CN=localhost", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


def make_pki(folder: Path) -> PKI:
    """A CA, its server and client certificates, and a rogue client, as PEM files."""
    require("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca")
    _ca(folder, "rogue-ca")
    _leaf(folder, "server", "ca", "serverAuth,clientAuth")
    _leaf(folder, "client", "ca", "clientAuth,serverAuth")
    _leaf(folder, "rogue", "rogue-ca", "clientAuth")
    pem = folder / "server.pem"
    pem.write_text((folder / "server.crt").read_text() + (folder / "server.key").read_text())
    return PKI(
        ca=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        rogue_cert=folder / "rogue.crt",
        rogue_key=folder / "rogue.key",
        server_pem=pem,
    )


def tls_args(cert: Path, key: Path, ca: Path) -> list[str]:
    """dcmtk's options for an authenticated TLS connection trusting ``ca``."""
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def storescu_tls(
    files: list[Path], port: int, *, called_ae: str, calling_ae: str, tls: list[str]
) -> subprocess.CompletedProcess[str]:
    """dcmtk's ``storescu`` over TLS (``tls``: :func:`tls_args`); one association."""
    require("storescu")
    cmd = [
        "storescu", "-R", "-aet", calling_ae, "-aec", called_ae, "--no-halt", *tls,
        "127.0.0.1", str(port), *map(str, files),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
