"""The sidecar under hostile input, kills, idle peers and settings that cannot work.

Real peers on loopback throughout: dcmtk's ``storescu`` sends, a real Orthanc
or a pynetdicom Storage SCP receives, the sidecar runs in-process (stepped
with ``run_once``) or as the real ``uqserve sidecar`` CLI in a subprocess.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.dicom_peers import (
    Orthanc,
    SyntheticSeries,
    free_port,
    phantom,
    require,
    sent,
    set_raw_value,
    storescu,
    wait_port,
    write_ct_series,
)
from uqserve.sidecar import (
    BundlePredictor,
    Limits,
    OutputOptions,
    Peer,
    Sidecar,
    SidecarConfig,
    build_outputs,
    series_key,
)

# The test itself writes and reads the invalid values; pydicom warns about them here.
pytestmark = [pytest.mark.dicom, pytest.mark.filterwarnings("ignore:Invalid value for VR")]

SENDER = "MODALITY1"
CLI = [sys.executable, "-c", "from uqserve.cli import app; app()", "sidecar"]

# A distinctive value in every patient, study and series field (and invalid UIDs,
# PatientSex U, an impossible birth date and study time): none may reach a log.
HOSTILE = {
    "PatientName": "ZQXSURNAMEONLY",  # one component: highdicom warns, quoting it
    "PatientID": "ZQX-PATIENT-ID",
    "PatientBirthDate": "19991399",  # month 13: highdicom refuses it
    "PatientSex": "U",  # not M/F/O: highdicom refuses it
    "PatientAge": "ZQXA",
    "OtherPatientIDs": "ZQX-OTHER-ID",
    "PatientAddress": "ZQX 1 Hidden Lane",
    "AccessionNumber": "ZQX-ACCESSION",
    "StudyID": "ZQXSTUDYID",
    "StudyDescription": "ZQX study description",
    "SeriesDescription": "ZQX series description",
    "StudyTime": "2561ZQ",  # not a time
    "ReferringPhysicianName": "ZQX^Referrer",
    "InstitutionName": "ZQX Institution",
    "InstitutionAddress": "ZQX Institution Street",
    "StationName": "ZQXSTATION",
    "OperatorsName": "ZQX^Operator",
    "PerformingPhysicianName": "ZQX^Performer",
}
BAD_UID = "1.2.826.0.1.3680043.99.0777"  # a zero-led component: pydicom warns, quoting it
SECRETS = [*HOSTILE.values(), "ZQX", "99.0777", "19991399", "2561ZQ"]
SECRETS.remove("U")


def hostile_series(folder: Path, shape: tuple[int, int, int] = (32, 32, 4)) -> SyntheticSeries:
    syn = write_ct_series(folder, phantom(shape, seed=4), shuffle_names=False)
    syn.study_uid, syn.series_uid = f"{BAD_UID}.1", f"{BAD_UID}.2"
    for k, path in enumerate(syn.files):
        ds = pydicom.dcmread(path)
        for keyword, value in HOSTILE.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = syn.study_uid, syn.series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{BAD_UID}.3.{k + 1}"
        ds.save_as(path, enforce_file_format=True)
    return syn


def _no_secrets(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"log leaks {leaked}"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require("Orthanc", "storescu")
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def _results(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    """Every non-image object Orthanc holds in ``study_uid``."""
    import urllib.request

    out = []
    for iid in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{iid}/simplified-tags")
        if tags.get("Modality") in ("CT", "MR") or tags.get("StudyInstanceUID") != study_uid:
            continue
        with urllib.request.urlopen(f"{orthanc.url}/instances/{iid}/file", timeout=10) as r:
            out.append(pydicom.dcmread(io.BytesIO(r.read())))
    return out


def _start_cli(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """The real ``uqserve sidecar``, output to ``log``; returns once it listens."""
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [*CLI, "--listen", f"127.0.0.1:{port}", *args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(TimeoutError):
            wait_port(port, timeout=0.5)
            return proc
    proc.kill()
    raise TimeoutError(f"sidecar did not listen within 60 s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _listening(
    tmp_path: Path, bundle: Path, orthanc: Orthanc | None = None, **kw: Any
) -> Iterator[Sidecar]:
    """A sidecar whose listener runs; the test steps its worker with ``run_once(now=...)``."""
    kw.setdefault("spool", tmp_path / "spool")
    kw.setdefault("allow_any", "allow" not in kw)
    if orthanc is not None:
        kw["send_to"] = Peer(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    config = SidecarConfig(ae_title="UQSIDECAR", host="127.0.0.1", port=0, **kw)
    sc = Sidecar(config, BundlePredictor(str(bundle), seed=1, device="cpu"))
    sc.scp.start()
    try:
        yield sc
    finally:
        sc.stop()


# --------------------------------------------------------------------------- 10, 11


def test_hostile_patient_data_gives_results_and_never_reaches_a_log(
    tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc
) -> None:
    syn = hostile_series(tmp_path / "ct")
    port, log = free_port(), tmp_path / "sidecar.log"
    args = [
        "--ae-title", "UQSIDECAR", "--allow", SENDER, "--verbose",
        "--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
        "--spool", str(tmp_path / "spool"), "--stable-seconds", "0.5",
        "--bundle", str(tiny_bundle), "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    proc = _start_cli(args, port, log)
    try:
        assert sent(storescu(syn.files, port, called_ae="UQSIDECAR", calling_ae=SENDER))
        got = orthanc.wait_for(
            lambda o: (r := _results(o, syn.study_uid)) and len(r) >= 5 and r, timeout=120
        )
    finally:
        _stop(proc)
    text = log.read_text()
    _no_secrets(text)  # --verbose: DEBUG and up, so every default-level line too
    key = series_key(syn.series_uid)
    assert f"series {key} delivered" in text
    assert "UserWarning from highdicom/base.py" in text  # the warning happened, without its text
    assert "invalid PatientBirthDate, PatientSex, StudyTime" in text
    # Results file into the patient and study; the invalid values are left empty
    # and the SR says so.
    for ds in got:
        assert ds.PatientID == HOSTILE["PatientID"] and ds.StudyInstanceUID == syn.study_uid
        assert ds.PatientSex == "" and ds.PatientBirthDate == "" and ds.StudyTime == ""
    (sr,) = [ds for ds in got if ds.Modality == "SR"]
    texts = " ".join(str(item.get("TextValue", "")) for item in sr.ContentSequence)
    assert "PatientBirthDate, PatientSex, StudyTime" in texts


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("truncated", "pixel data"),
        ("65535x65535", "voxels is more than the limit"),
        ("SliceThickness", "SliceThickness is not a number"),
        ("ImagePositionPatient", "ImagePositionPatient is not 3 numbers"),
        ("ImageOrientationPatient", "are not orthogonal"),
    ],
)
def test_bad_input_fails_at_once_without_retries(
    tmp_path: Path, tiny_bundle: Path, damage: str, said: str
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3)), shuffle_names=False)
    raw = {"SliceThickness": b"3 mm", "ImagePositionPatient": rb"0\0",
           "ImageOrientationPatient": rb"1\0\0\0.2\0.98\0"}  # fmt: skip
    for f in syn.files if damage == "65535x65535" else syn.files[1:2]:
        if damage in raw:  # malformed or impossible values: input errors, never retried
            set_raw_value(f, damage, raw[damage])
            continue
        ds = pydicom.dcmread(f)
        if damage == "truncated":
            ds.PixelData = ds.PixelData[:100]
        else:  # a header claiming 16 GiB per series: refused before allocating, not retried
            ds.Rows = ds.Columns = 65535
        ds.save_as(f)
    key = series_key(syn.series_uid)
    with _listening(tmp_path, tiny_bundle, max_attempts=5) as sc:
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
        assert sc.run_once(now=time.time() + 60) == [(key, "failed")]
    import json

    reason = json.loads((tmp_path / "spool" / "failed" / key / "reason.json").read_text())
    assert reason["attempts"] == 1 and said in reason["reason"]


# --------------------------------------------------------------------------- 12


def _sources(syn: SyntheticSeries) -> list[pydicom.Dataset]:
    ds = [pydicom.dcmread(f) for f in syn.files]
    return sorted(ds, key=lambda d: float(d.ImagePositionPatient[2]))


def _outputs(source: list[pydicom.Dataset], key: str = "k") -> list[pydicom.Dataset]:
    shape = (int(source[0].Columns), int(source[0].Rows), len(source))
    m = np.full(shape, 0.2, np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[4:8, 4:8, :] = 1
    return build_outputs(
        source,
        seg=seg,
        maps={"tu": m, "au": m, "eu": m},
        classes=["background", "lesion"],
        key=key,
        report={"volumes": {}},
        options=OutputOptions(),
    )


def test_output_uids_depend_on_the_set_of_source_instances(tmp_path: Path) -> None:
    source = _sources(write_ct_series(tmp_path / "ct", phantom((16, 16, 8))))
    whole = {str(d.SOPInstanceUID) for d in _outputs(source)}
    part = {str(d.SOPInstanceUID) for d in _outputs(source[3:5])}
    series = {str(d.SeriesInstanceUID) for d in _outputs(source[3:5])}
    assert len(whole) == len(part) == 5
    assert not whole & part  # a 2-frame SEG never shares a UID with the 8-frame one
    assert not series & {str(d.SeriesInstanceUID) for d in _outputs(source)}


def test_an_image_resent_with_new_content_under_its_old_uid_gets_new_output_uids(
    tmp_path: Path,
) -> None:
    source = _sources(write_ct_series(tmp_path / "ct", phantom((16, 16, 4))))
    first = {str(d.SOPInstanceUID) for d in _outputs(source)}
    source[2].PatientName = "Corrected^Name"  # same SOP Instance UID, other content
    assert not first & {str(d.SOPInstanceUID) for d in _outputs(source)}


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_rebuilt_outputs_are_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # highdicom stamps creation dates and times from its clock: give it one that the test
    # moves on by a day and an hour between the two builds (instead of sleeping).
    import highdicom.base
    import highdicom.sr.sop

    read: list[_dt.datetime] = []
    clock = [_dt.datetime(2026, 1, 2, 3, 4, 5)]

    class _Clock(_dt.datetime):
        @classmethod
        def now(cls, tz: _dt.tzinfo | None = None) -> _Clock:  # type: ignore[override]
            read.append(clock[0])
            return cls.fromtimestamp(clock[0].timestamp(), tz)

    shim = types.SimpleNamespace(**{**vars(_dt), "datetime": _Clock})
    for module in (highdicom.base, highdicom.sr.sop):
        monkeypatch.setattr(module, "datetime", shim)
    source = _sources(write_ct_series(tmp_path / "ct", phantom((16, 16, 4))))
    first = [_bytes(d) for d in _outputs(source)]
    clock[0] += _dt.timedelta(days=1, hours=1)
    assert [_bytes(d) for d in _outputs(source)] == first
    assert len(set(read)) == 2  # highdicom did read the clock, once at each time


def test_resending_part_of_a_finished_series_adds_nothing(
    tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc
) -> None:
    syn = write_ct_series(tmp_path / "ct", phantom((32, 32, 8), seed=6))
    key = series_key(syn.series_uid)
    with _listening(tmp_path, tiny_bundle, orthanc) as sc:
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
        assert sc.run_once(now=time.time() + 60) == [(key, "delivered")]
        before = sorted(str(d.SOPInstanceUID) for d in _results(orthanc, syn.study_uid))
        assert len(before) == 5
        assert sent(storescu(syn.files[2:4], sc.port, called_ae="UQSIDECAR"))
        assert sc.run_once(now=time.time() + 120) == [(key, "duplicate")]
    after = _results(orthanc, syn.study_uid)
    assert sorted(str(d.SOPInstanceUID) for d in after) == before
    (seg,) = [d for d in after if d.Modality == "SEG"]
    assert int(seg.NumberOfFrames) == 8
    record = sc.spool.done_record(key)
    assert record is not None and record["status"] == "delivered"
    assert record["ignored_resends"][0]["instances"] == 2


def test_late_instances_are_merged_and_the_series_processed_whole(
    tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc
) -> None:
    syn = write_ct_series(tmp_path / "ct", phantom((32, 32, 8), seed=12), shuffle_names=False)
    key = series_key(syn.series_uid)
    with _listening(tmp_path, tiny_bundle, orthanc) as sc:
        assert sent(storescu(syn.files[:5], sc.port, called_ae="UQSIDECAR"))
        assert sc.run_once(now=time.time() + 60) == [(key, "delivered")]  # 5 slices looked whole
        assert sent(storescu(syn.files[5:], sc.port, called_ae="UQSIDECAR"))  # the rest, late
        assert sc.run_once(now=time.time() + 120) == [(key, "delivered")]
        sc.run_once(now=time.time() + sc.config.keep_s + 200)  # kept images expire
    record = sc.spool.done_record(key)
    assert record is not None and record["slices"] == 8
    segs = [d for d in _results(orthanc, syn.study_uid) if d.Modality == "SEG"]
    assert sorted(int(d.NumberOfFrames) for d in segs) == [5, 8]  # two sets, two UIDs
    assert len({str(d.SOPInstanceUID) for d in segs}) == 2
    assert not any((tmp_path / "spool" / "kept").iterdir())


# --------------------------------------------------------------------------- 13


class RecordingSCP:
    """A real Storage SCP (pynetdicom) that keeps what it receives, byte for byte.

    While ``hold`` is set, the C-STORE after the first one waits (the sender is
    then mid-send) until ``release`` is set. Objects of a SOP class in
    ``refuse`` are answered with a failure status (0xC000, cannot understand).
    """

    def __init__(self, *, hold: bool = True, refuse: tuple[str, ...] = ()) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list[tuple[str, bytes]] = []
        self.second_arrived = threading.Event()
        self.release = threading.Event()
        self.hold = hold
        self.refuse = refuse
        self.ae = AE(ae_title="RECEIVER")
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            self.ae.add_supported_context(
                cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Any) -> int:
        if str(event.request.AffectedSOPClassUID) in self.refuse:
            return 0xC000
        raw = event.request.DataSet.getvalue()
        self.received.append((str(event.request.AffectedSOPInstanceUID), raw))
        if self.hold and len(self.received) == 2:
            self.second_arrived.set()
            self.release.wait(30)
            return 0xA700  # never acknowledged as stored
        return 0x0000

    def close(self) -> None:
        self.release.set()
        assert self.server is not None
        self.server.shutdown()


def test_killed_mid_send_then_restarted_sends_the_same_bytes(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((32, 32, 4), seed=8))
    receiver = RecordingSCP()
    port, log = free_port(), tmp_path / "sidecar.log"
    args = [
        "--ae-title", "UQSIDECAR", "--send-to", f"RECEIVER@127.0.0.1:{receiver.port}",
        "--allow-any", "--spool", str(tmp_path / "spool"), "--stable-seconds", "0.5",
        "--bundle", str(tiny_bundle), "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    try:
        first = _start_cli(args, port, log)
        try:
            assert sent(storescu(syn.files, port, called_ae="UQSIDECAR"))
            assert receiver.second_arrived.wait(120), log.read_text()[-2000:]
            first.send_signal(signal.SIGKILL)  # 1 of 5 results stored, the 2nd in flight
            first.wait(timeout=10)
        finally:
            _stop(first)
        receiver.hold = False
        receiver.release.set()
        second = _start_cli(args, port, log)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len({u for u, _ in receiver.received}) < 5:
                time.sleep(0.2)
        finally:
            _stop(second)
    finally:
        receiver.close()
    by_uid: dict[str, set[bytes]] = {}
    for uid, raw in receiver.received:
        by_uid.setdefault(uid, set()).add(raw)
    assert len(by_uid) == 5, log.read_text()[-2000:]
    assert all(len(versions) == 1 for versions in by_uid.values())  # re-sent = same bytes
    # Only what was not stored is sent again: the first result once, the held one twice.
    assert len(receiver.received) == 6
    record = (tmp_path / "spool" / "done" / f"{series_key(syn.series_uid)}.json").read_text()
    assert '"status": "delivered"' in record


def test_an_object_the_pacs_refuses_goes_to_dead_letter_at_once(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    from pydicom.uid import SegmentationStorage

    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3)))
    receiver = RecordingSCP(hold=False, refuse=(str(SegmentationStorage),))
    key = series_key(syn.series_uid)
    try:
        peer = Peer("RECEIVER", "127.0.0.1", receiver.port)
        with _listening(tmp_path, tiny_bundle, send_to=peer, send_backoff_s=0.01) as sc:
            assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
            assert sc.run_once(now=time.time() + 60) == [(key, "partial")]  # not retried
    finally:
        receiver.close()
    assert len(receiver.received) == 4  # the three maps and the SR
    record = sc.spool.done_record(key)
    assert record is not None and record["attempts"] == 1
    (name,) = record["dead_letter"]
    assert name.startswith("segmentation-") and "0xC000" in record["dead_letter"][name]
    assert (tmp_path / "spool" / "dead-letter" / key / name).is_file()


# --------------------------------------------------------------------------- 14


@contextlib.contextmanager
def _idle_sockets(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` TCP connections to ``port`` that never send a byte."""
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    try:
        yield idle
    finally:
        for s in idle:
            s.close()


def _wait_logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 30.0) -> None:
    """Wait for a rejection's log line: pynetdicom sends the rejection, then logs it from
    its own thread, so storescu may return first."""
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{caplog.text}"
        time.sleep(0.05)


def test_idle_connections_do_not_lock_out_senders(
    tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 2)))
    # The ACSE timeout is long enough that a loaded machine still tries while the
    # idle sockets are open (the log line below proves it did).
    limits = Limits(acse_s=15.0, max_associations=4)
    with _listening(tmp_path, tiny_bundle, limits=limits) as sc, _idle_sockets(sc.port, 10) as idle:
        t0 = time.monotonic()
        time.sleep(0.3)  # the listener has taken them all
        refused = storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae=SENDER)
        assert not sent(refused)
        _wait_logged(caplog, "association limit reached (4 in progress")
        assert "allowed list" not in caplog.text  # the sender is not blamed
        # Once the ACSE timeout has closed the idle sockets, the sender gets through.
        while not sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae=SENDER)):
            assert time.monotonic() - t0 < 15 + 120, "idle connections still lock senders out"
            time.sleep(0.2)
        # The idle sockets were closed by the sidecar (ARTIM timeout), not by us.
        for s in idle:
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):
                    pass
        wrong = storescu(syn.files, sc.port, called_ae="SOMEONEELSE", calling_ae=SENDER)
        assert not sent(wrong)
        _wait_logged(caplog, "called AE title 'SOMEONEELSE' is not this node's 'UQSIDECAR'")


def test_default_limit_serves_a_sender_beside_ten_idle_connections(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 2)))
    with _listening(tmp_path, tiny_bundle) as sc, _idle_sockets(sc.port, 10):
        # Rejected at once if the idle sockets held every slot (storescu does not retry).
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae=SENDER))


# --------------------------------------------------------------------------- 15


def test_cli_refuses_settings_that_cannot_work_before_listening(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    cases = [
        (["--device", "tpu"], "device 'tpu' unknown"),
        (["--spool", str(a_file)], f"spool {a_file} is not a folder"),
        (["--server", f"127.0.0.1:{free_port()}"], "no Triton server reachable"),
        (["--listen", f"127.0.0.1:{busy_port}"], "cannot listen on"),
    ]
    if os.geteuid() == 0 or not os.access("/sys", os.W_OK):
        cases.append((["--spool", "/sys/uqserve-spool"], "cannot be written"))
    from uqserve.runtime.embedded import cuda_available

    if not cuda_available():
        cases.append((["--device", "cuda"], "no usable GPU"))
    port = free_port()
    procs = []
    for extra, needle in cases:
        base = [*CLI, "--listen", f"127.0.0.1:{port}", "--bundle", str(tiny_bundle), "--allow-any"]
        base += ["--spool", str(tmp_path / "spool")]
        procs.append((subprocess.Popen(base + extra, stderr=subprocess.PIPE, text=True), needle))
    try:
        for proc, needle in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1, err
            assert needle in err and "Traceback" not in err, err
            assert len(err.strip().splitlines()) == 1, err
            if "cannot listen" not in needle:
                assert "cannot listen" not in err and "free port" not in err
    finally:
        busy.close()
    with pytest.raises(OSError):  # none of them ever listened
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def _small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``folder`` (needs root; skips otherwise)."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_acknowledges_only_what_it_kept(tmp_path: Path, tiny_bundle: Path) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((96, 96, 10), seed=3))  # ~18 kB a slice
    with _small_disk(tmp_path / "small", "120k") as disk:
        with _listening(tmp_path, tiny_bundle, spool=disk / "spool") as sc:
            cmd = ["storescu", "-v", "-R", "-aec", "UQSIDECAR", "--no-halt", "127.0.0.1"]
            proc = subprocess.run(
                [*cmd, str(sc.port), *map(str, syn.files)],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            # The sender is told (Out of Resources, 0xA700) and keeps what was refused.
            refused = proc.stderr.count("Received Store Response (Refused: OutOfResources)")
            key = series_key(syn.series_uid)
            kept = sorted((disk / "spool" / "incoming" / key).glob("*.dcm"))
            assert 0 < len(kept) < 10 and len(kept) + refused == 10
            by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in syn.files}
            for f in kept:  # every acknowledged instance is whole
                ds = pydicom.dcmread(f)
                assert ds.PixelData == pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)]).PixelData
            assert not list((disk / "spool" / "tmp").iterdir())  # no partial file left
            subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
            assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))  # the sender retries
            assert sc.run_once(now=time.time() + 60) == [(key, "written")]
        record = sc.spool.done_record(key)
        assert record is not None and record["slices"] == 10


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up, then free ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 65536)
            except OSError:
                break
        while True:  # the last partial chunks
            try:
                os.write(fd, b"\0" * 4096)
            except OSError:
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def test_full_disk_while_building_results_says_so_backs_off_and_cleans_up(
    tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((64, 64, 6), seed=5))
    key = series_key(syn.series_uid)
    with _small_disk(tmp_path / "small", "4m") as disk:
        with _listening(tmp_path, tiny_bundle, spool=disk / "spool", retry_base_s=30) as sc:
            assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
            out = disk / "spool" / "out" / key
            # Room for the state files, not for the results: a transient failure that says why.
            _fill(disk, leave=24 << 10)
            caplog.set_level(logging.INFO, logger="uqserve.sidecar")
            t = time.time() + 60
            assert sc.run_once(now=t) == [(key, "retry")]
            state = sc.spool.load_state(key)
            assert "No space left on device" in state.last_error
            assert not out.exists() or not list(out.iterdir())  # no partial results
            # No room at all: not even the state can be saved. Held back, logged once a try.
            (disk / "filler").unlink()
            _fill(disk, leave=0)
            assert sc.run_once(now=t + 100) == [(key, "retry")]
            assert sc.run_once(now=t + 101) == []  # backing off, silently
            said = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
            assert len(said) == 1 and "No space left on device" in said[0], said
            subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
            assert sc.run_once(now=t + 100 + 31) == [(key, "written")]
        assert len(list(out.glob("*.dcm"))) == 5


def test_failing_worker_passes_back_off(tmp_path: Path, tiny_bundle: Path) -> None:
    """A fault outside any series (the spool's kept/ is a file) backs the worker off."""
    config = SidecarConfig(allow_any=True, spool=tmp_path / "spool", port=0, poll_s=0.5)
    sc = Sidecar(config, BundlePredictor(str(tiny_bundle), seed=1, device="cpu"))
    kept = tmp_path / "spool" / "kept"
    kept.rmdir()
    kept.write_text("in the way")
    assert [sc._pass() for _ in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    kept.unlink()
    kept.mkdir()
    assert sc._pass() == 0.5 and sc._pass() == 0.5


def test_stable_clock_starts_when_the_listener_is_up(tmp_path: Path, tiny_bundle: Path) -> None:
    """A series found in the spool on start waits --stable-seconds from the listener's start,
    however long the start-up took (here: the spool opened 100 s before the listener)."""
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3)))
    key = series_key(syn.series_uid)
    config = SidecarConfig(allow_any=True,
        spool=tmp_path / "spool", ae_title="UQSIDECAR", host="127.0.0.1", port=0,
        stable_seconds=5.0,
    )  # fmt: skip
    incoming = tmp_path / "spool" / "incoming" / key
    incoming.mkdir(parents=True)
    for f in syn.files:  # left by a sidecar that was killed long ago
        shutil.copy(f, incoming / f"{f.stem}.dcm")
        os.utime(incoming / f"{f.stem}.dcm", (time.time() - 3600,) * 2)
    sc = Sidecar(config, BundlePredictor(str(tiny_bundle), seed=1, device="cpu"))
    sc.spool.opened -= 100  # the start-up (loading a model, say) took 100 s
    sc.scp.start()
    try:
        up = time.time()
        assert sc.run_once(now=up + 4) == []  # the sender may still be resuming
        assert sc.run_once(now=up + 6) == [(key, "written")]
    finally:
        sc.stop()


def test_failure_model_page_names_real_tests() -> None:
    """Every test the failure-model page cites for a promise exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "concepts" / "failure-model.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)?::(test_\w+)`", page)
    assert len(cited) >= 10
    current = ""
    for path, name in cited:
        current = path or current
        assert f"def {name}(" in (root / current).read_text(), f"{current}::{name}"


def test_sigterm_during_a_pacs_outage_exits_promptly_and_keeps_the_results(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3)))
    port, log = free_port(), tmp_path / "sidecar.log"
    args = [
        "--ae-title", "UQSIDECAR", "--allow-any", "--send-to", f"NOBODY@127.0.0.1:{free_port()}",
        "--spool", str(tmp_path / "spool"), "--stable-seconds", "0.5",
        "--bundle", str(tiny_bundle), "--device", "cpu",
    ]  # fmt: skip
    proc = _start_cli(args, port, log)
    try:
        assert sent(storescu(syn.files, port, called_ae="UQSIDECAR"))
        deadline = time.monotonic() + 120
        while "(attempt 1 of 4)" not in log.read_text():  # the PACS is down; back-off begins
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        # Waiting out the back-off (2 + 4 + 8 s) would take 14 s.
        assert time.monotonic() - t0 < 8, "SIGTERM waited for the send back-off"
    finally:
        _stop(proc)
    key = series_key(syn.series_uid)
    assert len(list((tmp_path / "spool" / "out" / key).glob("*.dcm"))) == 5  # kept for later
    assert (tmp_path / "spool" / "work" / key / "state.json").is_file()
