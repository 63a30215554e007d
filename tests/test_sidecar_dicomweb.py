"""STOW-RS delivery to a real Orthanc with its DICOMweb plugin, on loopback.

The sidecar runs in-process (stepped with ``run_once``) or as the real CLI,
killed while the archive has stored a result but not yet answered.
"""

from __future__ import annotations

import os
import signal
import ssl
import time
from pathlib import Path

import pydicom
import pytest

from tests.dicom_peers import free_port, phantom, require, sent, storescu, write_ct_series
from tests.dicomweb_peers import PASSWORD, USER, OrthancWeb, Relay, dicom_part
from tests.test_sidecar_faults import _listening, _start_cli, _stop
from tests.tls_peers import PKI, make_pki, storescu_tls
from uqserve.errors import UsageError
from uqserve.sidecar import series_key
from uqserve.sidecar.dicomweb import AUTH_ENV, WebAuth, WebPeer
from uqserve.sidecar.tls import TLSConfig

pytestmark = pytest.mark.dicom


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> OrthancWeb:
    with OrthancWeb(tmp_path_factory.mktemp("orthanc-web"), auth=True) as o:
        yield o  # type: ignore[misc]


def _auth_file(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "dicomweb-auth"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_results_are_stored_by_stow_rs_with_basic_auth_from_a_file(
    tmp_path: Path, tiny_bundle: Path, orthanc: OrthancWeb
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3), seed=21))
    key = series_key(syn.series_uid)
    peer = WebPeer.parse(orthanc.dicomweb + "/")
    wrong = WebAuth.load(_auth_file(tmp_path / "w", f"Basic {USER}:not-the-password"))
    right = WebAuth.load(_auth_file(tmp_path, f"Basic {USER}:{PASSWORD}"))
    kw = {"send_to": peer, "send_retries": 0}
    with _listening(tmp_path / "a", tiny_bundle, web_auth=wrong, **kw) as sc:
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
        assert sc.run_once(now=time.time() + 60) == [(key, "retry")]  # 401: kept, retried
        state = sc.spool.load_state(key)
    assert "credentials refused" in str(state.last_error)
    assert orthanc.results(syn.study_uid) == []
    with _listening(tmp_path / "b", tiny_bundle, web_auth=right, **kw) as sc:
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
        assert sc.run_once(now=time.time() + 60) == [(key, "delivered")]
        delivered = sc.metrics.results_delivered.labels("dicomweb")._value.get()
    got = orthanc.results(syn.study_uid)
    assert len(got) == 5 and delivered == 5
    assert {"SEG", "SR"} <= {t["Modality"] for t in got}
    record = sc.spool.done_record(key)
    assert record is not None and record["sent_to"] == orthanc.dicomweb


def test_https_is_verified_unless_the_hospital_ca_is_given(
    tmp_path: Path, tiny_bundle: Path, orthanc: OrthancWeb, tmp_path_factory: pytest.TempPathFactory
) -> None:
    require("storescu")
    pki: PKI = make_pki(tmp_path_factory.mktemp("pki-web"))
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3), seed=22))
    key = series_key(syn.series_uid)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    relay = Relay(orthanc.url, hold=False, tls=server)
    auth = WebAuth.load(_auth_file(tmp_path, f"Basic {USER}:{PASSWORD}"))
    kw = {"send_to": WebPeer.parse(f"{relay.url}/dicom-web"), "send_retries": 0, "web_auth": auth}
    try:
        with _listening(tmp_path / "a", tiny_bundle, **kw) as sc:  # the system's CAs only
            assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
            assert sc.run_once(now=time.time() + 60) == [(key, "retry")]
            assert "ConnectError" in str(sc.spool.load_state(key).last_error)
        assert relay.bodies == [] and orthanc.results(syn.study_uid) == []
        tls = TLSConfig.from_files(pki.client_cert, pki.client_key, pki.ca)
        with _listening(tmp_path / "b", tiny_bundle, tls=tls, **kw) as sc:
            tls_args_ = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
            pushed = storescu_tls(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae="M",
                                  tls=tls_args_)  # fmt: skip
            assert sent(pushed)
            assert sc.run_once(now=time.time() + 60) == [(key, "delivered")]
    finally:
        relay.close()
    assert len(relay.bodies) == 5 and len(orthanc.results(syn.study_uid)) == 5


def test_a_bearer_token_from_the_environment_is_sent_and_reread_each_delivery(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("storescu")
    first = write_ct_series(tmp_path / "ct1", phantom((16, 16, 3), seed=25))
    second = write_ct_series(tmp_path / "ct2", phantom((16, 16, 3), seed=26))
    monkeypatch.setenv(AUTH_ENV, "Bearer token-one")
    auth = WebAuth.load()
    with OrthancWeb(tmp_path / "orthanc") as orthanc:  # no auth: the relay sees the header
        relay = Relay(orthanc.url, hold=False)
        kw = {"send_to": WebPeer.parse(f"{relay.url}/dicom-web"), "web_auth": auth}
        try:
            with _listening(tmp_path, tiny_bundle, **kw) as sc:
                assert sent(storescu(first.files, sc.port, called_ae="UQSIDECAR"))
                assert sc.run_once(now=time.time() + 60)[0][1] == "delivered"
                monkeypatch.setenv(AUTH_ENV, "Bearer token-two")  # rotated
                assert sent(storescu(second.files, sc.port, called_ae="UQSIDECAR"))
                assert sc.run_once(now=time.time() + 120)[0][1] == "delivered"
        finally:
            relay.close()
    assert relay.authorizations == ["Bearer token-one"] * 5 + ["Bearer token-two"] * 5


def test_what_each_archive_answer_means() -> None:
    from uqserve.sidecar.dicomweb import _judge

    uid = "1.2.3.4"

    def seq(*items: dict[str, object]) -> dict[str, object]:
        return {"vr": "SQ", "Value": list(items)}

    ref = {"00081155": {"vr": "UI", "Value": [uid]}}
    failed = {**ref, "00081197": {"vr": "US", "Value": [0xA700]}}
    stored = _judge(200, {"00081199": seq(ref), "00081198": seq()}, uid)
    assert stored.stored and not stored.refused
    # An instance in the Failed SOP Sequence is refused whatever the HTTP status.
    for status in (200, 202, 409):
        answer = _judge(status, {"00081198": seq(failed)}, uid)
        assert answer.refused and "0xA700" in answer.reason
    # Orthanc's answer to a body it cannot parse: 400 with both sequences empty.
    assert _judge(400, {"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}, uid).refused
    for status in (401, 403, 404, 408, 429, 500, 503):
        answer = _judge(status, {}, uid)
        assert not answer.stored and not answer.refused, status  # kept, tried again
    unconfirmed = _judge(200, {"00081199": seq()}, uid)  # "OK" without naming it: not stored
    assert not unconfirmed.stored and not unconfirmed.refused


def test_killed_while_the_archive_has_stored_a_result_unconfirmed_then_restarted(
    tmp_path: Path, tiny_bundle: Path, orthanc: OrthancWeb
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((32, 32, 4), seed=24))
    relay = Relay(orthanc.url)
    port, log = free_port(), tmp_path / "sidecar.log"
    args = [
        "--ae-title", "UQSIDECAR", "--allow-any", "--send-to", f"{relay.url}/dicom-web",
        "--dicomweb-auth-file", str(_auth_file(tmp_path, f"basic {USER}:{PASSWORD}")),
        "--spool", str(tmp_path / "spool"), "--stable-seconds", "0.5",
        "--bundle", str(tiny_bundle), "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    try:
        first = _start_cli(args, port, log)
        try:
            assert sent(storescu(syn.files, port, called_ae="UQSIDECAR"))
            assert relay.second_stored.wait(120), log.read_text()[-2000:]
            first.send_signal(signal.SIGKILL)  # 2 results stored, only the 1st confirmed
            first.wait(timeout=10)
        finally:
            _stop(first)
        relay.hold = False
        relay.release.set()
        second = _start_cli(args, port, log)
        try:
            done = tmp_path / "spool" / "done" / f"{series_key(syn.series_uid)}.json"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not done.exists():
                time.sleep(0.2)
        finally:
            _stop(second)
    finally:
        relay.close()
    by_uid: dict[str, set[bytes]] = {}
    for body in relay.bodies:
        part = dicom_part(body)
        by_uid.setdefault(
            str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(part)).SOPInstanceUID), set()
        ).add(part)
    assert len(by_uid) == 5, log.read_text()[-2000:]
    assert all(len(versions) == 1 for versions in by_uid.values())  # re-sent = same bytes
    assert len(relay.bodies) == 6  # only the unconfirmed one went twice
    assert len(orthanc.results(syn.study_uid)) == 5  # and the archive holds it once
    assert '"status": "delivered"' in done.read_text()


def test_credentials_come_only_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert WebAuth.load() is None
    monkeypatch.setenv(AUTH_ENV, "Bearer abc.def")
    auth = WebAuth.load()
    assert auth is not None and auth.header() == "Bearer abc.def"
    assert "abc.def" not in repr(auth)  # the secret is read when needed, never kept
    with pytest.raises(UsageError, match="both"):
        WebAuth.load(_auth_file(tmp_path, "Bearer x"))
    monkeypatch.setenv(AUTH_ENV, "token-without-scheme")
    with pytest.raises(UsageError, match="expected 'Bearer <token>'"):
        WebAuth.load()
    with pytest.raises(UsageError, match="remove the credentials from the URL"):
        WebPeer.parse("https://user:pw@pacs.example.org/dicom-web")
    with pytest.raises(UsageError, match="expected http"):
        WebPeer.parse("ftp://pacs/dicom-web")
    assert os.environ[AUTH_ENV] == "token-without-scheme"
