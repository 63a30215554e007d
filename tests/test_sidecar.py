"""The PACS sidecar against real DICOM peers on loopback.

dcmtk's ``storescu`` sends synthetic CT series to the sidecar; a real Orthanc
receives the results; its REST API hands the stored files back, which are
checked for content, references and IOD validity (``dciodvfy``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.dicom_peers import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    Orthanc,
    SyntheticSeries,
    dciodvfy,
    echoscu,
    free_port,
    phantom,
    require,
    sent,
    storescu,
    wait_port,
    write_ct_series,
)
from uqserve.sidecar import BundlePredictor, OutputOptions, Peer, Sidecar, SidecarConfig, series_key

pytestmark = pytest.mark.dicom

SHAPE = (64, 64, 8)
SENDER = "MODALITY1"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require("Orthanc", "storescu")
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def _received(orthanc: Orthanc, series_uid: str) -> dict[str, pydicom.Dataset]:
    """Results in Orthanc that reference ``series_uid``, keyed by ContentLabel/Modality."""
    found = {}
    for iid in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{iid}/simplified-tags")
        if tags.get("Modality") in ("CT", "MR"):
            continue
        raw = _download(orthanc, iid)
        ds = pydicom.dcmread(io.BytesIO(raw))
        refs = {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])}
        for ev in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
            refs |= {str(s.SeriesInstanceUID) for s in ev.ReferencedSeriesSequence}
        if series_uid in refs:
            found[str(getattr(ds, "ContentLabel", ds.Modality))] = ds
    return found


def _download(orthanc: Orthanc, iid: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{orthanc.url}/instances/{iid}/file", timeout=10) as r:
        return bytes(r.read())


def _wait_results(
    orthanc: Orthanc, series_uid: str, n: int, timeout: float = 90
) -> dict[str, pydicom.Dataset]:
    def check(o: Orthanc) -> dict[str, pydicom.Dataset] | None:
        got = _received(o, series_uid)
        return got if len(got) >= n else None

    return dict(orthanc.wait_for(check, timeout=timeout, interval=0.5))


def _sidecar(tmp_path: Path, bundle: Path, orthanc: Orthanc | None, **kw: object) -> Sidecar:
    config = SidecarConfig(
        spool=tmp_path / "spool",
        ae_title="UQSIDECAR",
        host="127.0.0.1",
        port=0,
        allow=(SENDER,),
        send_to=Peer(orthanc.aet, "127.0.0.1", orthanc.dicom_port) if orthanc else None,
        stable_seconds=kw.pop("stable_seconds", 0.5),  # type: ignore[arg-type]
        poll_s=0.1,
        send_backoff_s=0.1,
        **kw,  # type: ignore[arg-type]
    )
    servers = kw.get("servers", ())
    return Sidecar(config, BundlePredictor(str(bundle), servers, seed=7, device="cpu"))  # type: ignore[arg-type]


@contextlib.contextmanager
def _listening(sc: Sidecar) -> Iterator[Sidecar]:
    """Only the sidecar's listener runs; the test steps the worker with :func:`_step`."""
    sc.scp.start()
    try:
        yield sc
    finally:
        sc.stop()


def _step(sc: Sidecar, later: float) -> list[tuple[str, str]]:
    """One worker pass as if ``later`` seconds had passed: series are stable, back-offs over."""
    return sc.run_once(now=time.time() + later)


def _frames_by_position(ds: pydicom.Dataset, source: list[pydicom.Dataset]) -> np.ndarray:
    """Frames of a multi-frame result, reordered to match ``source`` by plane position."""
    positions = [
        tuple(np.round(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float), 3))
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    index = {p: i for i, p in enumerate(positions)}
    frames = ds.pixel_array
    order = [
        index[tuple(np.round(np.asarray(s.ImagePositionPatient, dtype=float), 3))] for s in source
    ]
    return np.asarray(frames[order], dtype=np.float32)


def _no_identifiers(text: str, syn: SyntheticSeries) -> None:
    for secret in (
        PATIENT_NAME,
        "Doe",
        "Janet",
        PATIENT_ID,
        PATIENT_BIRTH_DATE,
        "ACC-SECRET",
        syn.study_uid,
        syn.series_uid,
    ):
        assert secret not in text, f"log leaks {secret!r}"
    for f in (f for f in syn.files if f.exists()):
        assert str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) not in text


def test_end_to_end_results_reach_orthanc(
    tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc, caplog: pytest.LogCaptureFixture
) -> None:
    require("dciodvfy")
    caplog.set_level(logging.DEBUG)
    syn = write_ct_series(tmp_path / "ct", phantom(SHAPE, seed=2))
    with _sidecar(tmp_path, tiny_bundle, orthanc, outputs=OutputOptions(fractional=True)) as sc:
        assert echoscu(sc.port, called_ae="UQSIDECAR", calling_ae=SENDER).returncode == 0
        proc = storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae=SENDER)
        assert sent(proc), proc.stderr
        got = _wait_results(orthanc, syn.series_uid, 6)
    assert set(got) == {"SEGMENTATION", "TU", "AU", "EU", "PROBABILITY", "SR"}

    # What the sidecar sent equals a direct prediction of the same series.
    from uqserve.prediction import predict_volume
    from uqserve.volumes.dicom import read_series

    series = read_series(syn.files)
    pred = predict_volume(series.volume, str(tiny_bundle), seed=7)
    seg = hd.seg.Segmentation.from_dataset(got["SEGMENTATION"])
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    src_uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=src_uids, combine_segments=True, skip_overlap_checks=True
    )  # [Z, rows, cols]
    np.testing.assert_array_equal(np.transpose(labels, (2, 1, 0)), pred.seg)
    assert pred.seg.any() and not pred.seg.all()  # a real segmentation, not trivially empty/full
    for kind in ("TU", "AU", "EU"):
        pm = got[kind]
        values = _frames_by_position(pm, series.datasets)  # [Z, rows, cols] in source order
        np.testing.assert_allclose(
            np.transpose(values, (2, 1, 0)), getattr(pred, kind.lower()), rtol=1e-6, atol=1e-7
        )
        rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "{nat}"
    # Every object references the source study and series, and validates.
    for label, ds in got.items():
        assert ds.StudyInstanceUID == syn.study_uid, label
        assert ds.PatientID == PATIENT_ID, label  # results file into the same patient
        path = tmp_path / f"{label}.dcm"
        ds.save_as(path)
        errors, _ = dciodvfy(path)
        assert not errors, f"{label}: {errors}"
    sr = got["SR"]
    texts = [str(item.get("TextValue", "")) for item in sr.ContentSequence]
    assert any("volume" in t and "mL" in t for t in texts)
    # The spool: nothing left to do, a record of the delivery.
    key = series_key(syn.series_uid)
    record = sc.spool.done_record(key)
    assert record is not None and record["status"] == "delivered" and record["slices"] == SHAPE[2]
    assert not any((tmp_path / "spool" / "incoming").iterdir())
    _no_identifiers(caplog.text, syn)
    assert key in caplog.text  # series are named by hash


def test_disallowed_ae_rejected(tmp_path: Path, tiny_bundle: Path) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 2)))
    with _sidecar(tmp_path, tiny_bundle, None) as sc:
        proc = storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae="INTRUDER")
        assert proc.returncode != 0
        assert "reject" in (proc.stdout + proc.stderr).lower()
        assert not any((tmp_path / "spool" / "incoming").iterdir())
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae=SENDER))


def test_bad_series_fail_with_reason_and_listener_survives(
    tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gap = write_ct_series(tmp_path / "gap", phantom((16, 16, 5)), shuffle_names=False)
    gap.files[2].unlink()
    broken = write_ct_series(tmp_path / "broken", phantom((16, 16, 3)), shuffle_names=False)
    ds = pydicom.dcmread(broken.files[1])
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data, still parseable
    ds.save_as(broken.files[1])
    seg_file = get_testdata_file("liver_1frame.dcm", download=False)  # a SEG: unsupported modality
    good = write_ct_series(tmp_path / "good", phantom((32, 32, 4), seed=5))
    with _listening(_sidecar(tmp_path, tiny_bundle, orthanc)) as sc:
        send = lambda files: storescu(files, sc.port, called_ae="UQSIDECAR", calling_ae=SENDER)  # noqa: E731
        assert sent(send(gap.files[:2] + gap.files[3:]))
        assert sent(send(broken.files))
        if seg_file is not None:
            assert sent(send([seg_file]))
        assert sent(send(good.files))
        outcomes = dict(_step(sc, later=60.0))
        assert outcomes[series_key(good.series_uid)] == "delivered", outcomes
        _wait_results(orthanc, good.series_uid, 5)
    reason = sc.spool.failed_reason(series_key(gap.series_uid))
    assert reason is not None and "1 slice(s) missing" in reason
    reason = sc.spool.failed_reason(series_key(broken.series_uid))
    assert reason is not None and "pixel data" in reason
    if seg_file is not None:
        seg_series = str(pydicom.dcmread(seg_file, stop_before_pixels=True).SeriesInstanceUID)
        reason = sc.spool.failed_reason(series_key(seg_series))
        assert reason is not None and "unsupported modality 'SEG'" in reason
    assert (tmp_path / "spool" / "failed" / series_key(gap.series_uid) / "reason.json").is_file()
    _no_identifiers(caplog.text, gap)


def test_model_server_outage_is_retried_then_failed(
    tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require("storescu")
    caplog.set_level(logging.INFO)
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3)))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: a Triton outage
    config = SidecarConfig(
        allow_any=True,
        spool=tmp_path / "spool",
        ae_title="UQSIDECAR",
        host="127.0.0.1",
        port=0,
        stable_seconds=0.2,
        poll_s=0.05,
        max_attempts=3,
        retry_base_s=0.1,
    )
    key = series_key(syn.series_uid)
    sc = Sidecar(config, BundlePredictor(str(tiny_bundle), [dead], device="cpu"))
    with _listening(sc):
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae=SENDER))
        # Stepped, not polled: each pass runs once the retry back-off has passed.
        outcomes = [_step(sc, later=3600.0 * i) for i in (1, 2, 3)]
        assert outcomes == [[(key, "retry")], [(key, "retry")], [(key, "failed")]]
        # The listener still answers after the failures.
        assert echoscu(sc.port, called_ae="UQSIDECAR").returncode == 0
    reason = sc.spool.failed_reason(key)
    assert reason is not None and reason.startswith("gave up after 3 attempts")
    assert caplog.text.count(f"series {key}: attempt") == 2
    # The instances are kept for an operator to requeue (move back to incoming/).
    assert len(list((tmp_path / "spool" / "failed" / key).glob("*.dcm"))) == 3


def _start_cli(
    tmp_path: Path, bundle: Path, port: int, orthanc: Orthanc, log: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-c", "from uqserve.cli import app; app()", "sidecar",
        "--listen", f"127.0.0.1:{port}", "--ae-title", "UQSIDECAR", "--allow", SENDER,
        "--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
        "--spool", str(tmp_path / "spool"), "--stable-seconds", "1.5",
        "--bundle", str(bundle), "--seed", "3", "--device", "cpu", "--verbose",
    ]  # fmt: skip
    logf = open(log, "ab")
    proc = subprocess.Popen(
        cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    logf.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            wait_port(port, timeout=0.5)
            return proc
        except TimeoutError:
            continue
    proc.kill()
    raise TimeoutError(f"sidecar did not listen within 60 s: {log.read_text()[-3000:]}")


def test_killed_mid_series_and_restarted_still_delivers(
    tmp_path: Path, tiny_bundle: Path, orthanc: Orthanc
) -> None:
    syn = write_ct_series(tmp_path / "ct", phantom(SHAPE, seed=9))
    port = free_port()
    log = tmp_path / "sidecar.log"
    first = _start_cli(tmp_path, tiny_bundle, port, orthanc, log)
    try:
        assert sent(storescu(syn.files[:5], port, called_ae="UQSIDECAR", calling_ae=SENDER))
        first.send_signal(signal.SIGKILL)  # acknowledged instances must already be on disk
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    key = series_key(syn.series_uid)
    assert len(list((tmp_path / "spool" / "incoming" / key).glob("*.dcm"))) == 5
    second = _start_cli(tmp_path, tiny_bundle, port, orthanc, log)
    try:
        assert sent(storescu(syn.files[5:], port, called_ae="UQSIDECAR", calling_ae=SENDER))
        got = _wait_results(orthanc, syn.series_uid, 5)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    assert second.returncode == 0
    seg = got["SEGMENTATION"]
    # All eight slices were segmented: the restart resumed the spooled half.
    refs = {
        str(r.ReferencedSOPInstanceUID)
        for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert refs == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in syn.files
    }
    _no_identifiers(log.read_text(), syn)


def test_unsendable_results_go_to_dead_letter(tmp_path: Path, tiny_bundle: Path) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3)))
    config = SidecarConfig(
        allow_any=True,
        spool=tmp_path / "spool",
        ae_title="UQSIDECAR",
        host="127.0.0.1",
        port=0,
        stable_seconds=0.2,
        poll_s=0.05,
        send_to=Peer("NOBODY", "127.0.0.1", free_port()),  # a PACS that is down
        send_retries=1,
        send_backoff_s=0.01,
        max_attempts=2,
    )
    key = series_key(syn.series_uid)
    sc = Sidecar(config, BundlePredictor(str(tiny_bundle), device="cpu"))
    with _listening(sc):
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
        # An unreachable PACS is temporary: the built results wait in out/ for the next try...
        assert _step(sc, later=60.0) == [(key, "retry")]
        assert len(list((tmp_path / "spool" / "out" / key).glob("*.dcm"))) == 5
        # ...and go to dead-letter/ when the last try fails too: none delivered.
        assert _step(sc, later=3600.0) == [(key, "undelivered")]
    record = sc.spool.done_record(key)
    assert record is not None and record["status"] == "undelivered"
    letters = tmp_path / "spool" / "dead-letter" / key
    dcm = sorted(letters.glob("*.dcm"))
    assert len(dcm) == 5 and len(record["dead_letter"]) == 5  # SEG, 3 maps, SR
    for f in dcm:
        reason = (letters / f"{f.name}.reason.json").read_text()
        assert "peer unreachable" in reason and "after 2 attempts" in reason
        assert pydicom.dcmread(f).StudyInstanceUID == syn.study_uid  # intact, can be re-sent


def test_peer_and_address_parsing() -> None:
    assert Peer.parse("ORTHANC@pacs.local:4242") == Peer("ORTHANC", "pacs.local", 4242)
    with pytest.raises(ValueError, match="AE@HOST:PORT"):
        Peer.parse("pacs.local:4242")
    with pytest.raises(ValueError, match="16 printable"):
        Peer.parse("A_VERY_LONG_AE_TITLE_X@h:1")
    with pytest.raises(ValueError, match="port"):
        Peer.parse("AE@h:70000")


def test_cli_errors_are_one_line(tmp_path: Path, tiny_bundle: Path) -> None:
    from typer.testing import CliRunner

    from uqserve.cli import app

    runner = CliRunner()
    base = ["sidecar", "--spool", str(tmp_path / "s"), "--listen", f"127.0.0.1:{free_port()}"]
    base += ["--allow", SENDER]
    for extra, needle in [
        (["--bundle", str(tmp_path / "missing")], "no such bundle"),
        (["--bundle", str(tiny_bundle), "--send-to", "nowhere"], "AE@HOST:PORT"),
        (["--bundle", str(tiny_bundle), "--seg-type", "fractional"], "seg_type"),
        (["--bundle", str(tiny_bundle), "--ae-title", "X" * 17], "16 printable"),
    ]:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 1, result.output
        assert needle in result.stderr, result.stderr
        assert "Traceback" not in result.output + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_sidecar_imports_no_torch() -> None:
    code = (
        "import sys, uqserve.sidecar, uqserve.cli.sidecar, uqserve.prediction; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


# The routing rule from docs/guides/sidecar.md ("Orthanc routing rule"), verbatim.
ROUTE_LUA = """
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if (modality == 'CT' or modality == 'MR') then
    -- a C-STORE job of the whole series to the sidecar (modality 'uqserve')
    RestApiPost('/modalities/uqserve/store', seriesId)
  end
end
"""


def test_orthanc_routes_new_series_through_the_sidecar(tmp_path: Path, tiny_bundle: Path) -> None:
    """The deployment loop: modality -> Orthanc -> (Lua rule) -> sidecar -> Orthanc."""
    require("Orthanc", "storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((32, 32, 4), seed=11))
    port = free_port()
    modalities = {"uqserve": ("UQSIDECAR", "127.0.0.1", port)}
    with Orthanc(tmp_path / "pacs", modalities=modalities, lua=ROUTE_LUA) as pacs:
        config = SidecarConfig(
            spool=tmp_path / "spool",
            ae_title="UQSIDECAR",
            host="127.0.0.1",
            port=port,
            allow=(pacs.aet,),
            send_to=Peer(pacs.aet, "127.0.0.1", pacs.dicom_port),
            stable_seconds=0.5,
            poll_s=0.1,
        )
        with Sidecar(config, BundlePredictor(str(tiny_bundle), device="cpu")):
            assert sent(storescu(syn.files, pacs.dicom_port, called_ae=pacs.aet))
            got = _wait_results(pacs, syn.series_uid, 5, timeout=60)
        assert set(got) == {"SEGMENTATION", "TU", "AU", "EU", "SR"}
        # Results sit in the source study, next to the CT series.
        studies = pacs.get("/studies")
        assert len(studies) == 1
        assert len(pacs.get(f"/studies/{studies[0]}/series")) == 1 + 5


def test_docs_show_the_tested_routing_rule() -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "guides" / "sidecar.md"
    assert ROUTE_LUA.strip() in page.read_text()
