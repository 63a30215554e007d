"""DICOM TLS: dcmtk's ``storescu +tls`` into the sidecar, the sidecar into ``storescp +tls``.

Certificates are made by the real ``openssl`` command (:mod:`tests.tls_peers`);
everything runs on loopback.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.dicom_peers import (
    free_port,
    phantom,
    require,
    running,
    sent,
    storescu,
    wait_port,
    write_ct_series,
)
from tests.test_sidecar_faults import _listening
from tests.tls_peers import PKI, make_pki, storescu_tls, tls_args
from uqserve.errors import UsageError
from uqserve.sidecar import Peer, Sidecar, series_key
from uqserve.sidecar.tls import MINIMUM_VERSION, TLSConfig

pytestmark = pytest.mark.dicom

CLI = [sys.executable, "-c", "from uqserve.cli import app; app()", "sidecar"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_storescu_over_tls_is_received_and_plain_or_untrusted_senders_are_refused(
    tmp_path: Path, tiny_bundle: Path, pki: PKI
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3)))
    tls = TLSConfig.from_files(pki.server_cert, pki.server_key, pki.ca)
    with _listening(tmp_path, tiny_bundle, tls=tls) as sc:
        plain = storescu(syn.files, sc.port, called_ae="UQSIDECAR")
        rogue = storescu_tls(
            syn.files, sc.port, called_ae="UQSIDECAR", calling_ae="ROGUE",
            tls=tls_args(pki.rogue_cert, pki.rogue_key, pki.ca),
        )  # fmt: skip
        assert not sent(plain) and not sent(rogue)
        assert sc.spool.pending() == []  # nothing of theirs was spooled
        good = storescu_tls(
            syn.files, sc.port, called_ae="UQSIDECAR", calling_ae="MODALITY",
            tls=tls_args(pki.client_cert, pki.client_key, pki.ca),
        )  # fmt: skip
        assert sent(good), good.stdout + good.stderr
        key = series_key(syn.series_uid)
        assert sc.run_once(now=time.time() + 60) == [(key, "written")]
    assert len(list((tmp_path / "spool" / "out" / key).glob("*.dcm"))) == 5


def test_tls_older_than_1_2_is_refused(tmp_path: Path, tiny_bundle: Path, pki: PKI) -> None:
    require("openssl")
    tls = TLSConfig.from_files(pki.server_cert, pki.server_key, pki.ca)
    assert tls is not None
    assert tls.server_context().minimum_version == MINIMUM_VERSION == ssl.TLSVersion.TLSv1_2
    assert tls.client_context().minimum_version == MINIMUM_VERSION

    def handshake(version: str, sc: Sidecar) -> bool:
        cmd = [
            "openssl", "s_client", "-connect", f"127.0.0.1:{sc.port}", version,
            "-cipher", "DEFAULT:@SECLEVEL=0", "-cert", str(pki.client_cert),
            "-key", str(pki.client_key), "-CAfile", str(pki.ca), "-verify_return_error",
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, input="", capture_output=True, text=True, timeout=30, check=False
        )
        return proc.returncode == 0 and "Verify return code: 0 (ok)" in proc.stdout

    with _listening(tmp_path, tiny_bundle, tls=tls) as sc:
        assert handshake("-tls1_2", sc) and handshake("-tls1_3", sc)
        assert not handshake("-tls1_1", sc)


def _storescp(folder: Path, port: int, pki: PKI) -> list[str]:
    """dcmtk's storescp over TLS: server certificate, client certificates required."""
    return [
        "storescp", "-aet", "PACS", "-od", str(folder), "+uf",
        *tls_args(pki.server_cert, pki.server_key, pki.ca), str(port),
    ]  # fmt: skip


def _push(files: list[Path], port: int, pki: PKI) -> subprocess.CompletedProcess[str]:
    tls = tls_args(pki.client_cert, pki.client_key, pki.ca)
    return storescu_tls(files, port, called_ae="UQSIDECAR", calling_ae="MODALITY", tls=tls)


def test_results_are_sent_over_tls_and_an_unverified_peer_gets_nothing(
    tmp_path: Path, tiny_bundle: Path, pki: PKI
) -> None:
    require("storescp", "storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3), seed=2))
    received = tmp_path / "pacs"
    received.mkdir()
    pacs_port = free_port()
    key = series_key(syn.series_uid)
    peer = Peer("PACS", "127.0.0.1", pacs_port)
    with running(_storescp(received, pacs_port, pki), tmp_path / "storescp.log"):
        wait_port(pacs_port)
        # Our certificate, but no CA given: the peer is checked against the system's
        # CAs, which did not sign it. Nothing is sent; the series waits for a retry.
        untrusting = TLSConfig.from_files(pki.client_cert, pki.client_key)
        kw = {"send_to": peer, "send_retries": 0}
        with _listening(tmp_path / "a", tiny_bundle, tls=untrusting, **kw) as sc:
            assert sent(_push(syn.files, sc.port, pki))
            assert sc.run_once(now=time.time() + 60) == [(key, "retry")]
        assert list(received.iterdir()) == []
        trusting = TLSConfig.from_files(pki.client_cert, pki.client_key, pki.ca)
        with _listening(tmp_path / "b", tiny_bundle, tls=trusting, **kw) as sc:
            assert sent(_push(syn.files, sc.port, pki))
            assert sc.run_once(now=time.time() + 60) == [(key, "delivered")]
    got = [pydicom.dcmread(f) for f in received.iterdir()]
    assert len(got) == 5 and {"SEG", "SR"} <= {str(d.Modality) for d in got}
    assert {str(d.StudyInstanceUID) for d in got} == {syn.study_uid}


def test_tls_settings_that_cannot_work_are_refused_naming_the_flag(
    tmp_path: Path, pki: PKI
) -> None:
    with pytest.raises(UsageError, match="--tls-cert and --tls-key go together"):
        TLSConfig.from_files(pki.server_cert, None)
    with pytest.raises(UsageError, match="--tls-ca needs"):
        TLSConfig.from_files(None, None, pki.ca)
    with pytest.raises(UsageError, match=r"--tls-key .*: no such file"):
        TLSConfig.from_files(pki.server_cert, tmp_path / "missing.key")
    with pytest.raises(UsageError, match="matching unencrypted private key"):
        TLSConfig.from_files(pki.server_cert, pki.client_key)  # another certificate's key
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(UsageError, match=r"--tls-ca .*ca\.txt: not a PEM CA"):
        TLSConfig.from_files(pki.server_cert, pki.server_key, not_pem)
    # The command line says the same in one line, before listening.
    port = free_port()
    proc = subprocess.run(
        [*CLI, "--listen", f"127.0.0.1:{port}", "--spool", str(tmp_path / "spool"),
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key), "--device", "cpu",
         "--allow-any"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "matching unencrypted private key" in proc.stderr
    assert "Traceback" not in proc.stderr
