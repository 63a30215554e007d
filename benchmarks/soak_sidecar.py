"""Soak the DICOM sidecar: senders, kills and a PACS outage on loopback; prints JSON.

    .venv/bin/python benchmarks/soak_sidecar.py [--senders 3] [--series 12] [--slices 6]
        [--size 48] [--duration 150] [--kills 3] [--pacs-down 15] [--seed 0]
        [--tls] [--dicomweb]

What runs, all real and on 127.0.0.1:

* the sidecar: ``uqserve sidecar`` as a subprocess (shipped ``softmax-ensemble``
  bundle unless ``--bundle``), killed with SIGKILL at ``--kills`` seeded random
  moments and restarted on the same spool;
* the receiving PACS: dcmtk's ``storescp --unique-filenames``, so every object
  it is sent is kept, repeats included; stopped once for ``--pacs-down`` s;
* ``--senders`` threads push ``--series`` synthetic CT series with dcmtk's
  ``storescu``, one association per series, at seeded moments spread over
  the first 70 % of ``--duration`` (when the kills and the outage happen),
  retrying a series whole until it is acknowledged (as a modality does when
  its peer is down).

``--tls``: certificates made with ``openssl`` (a CA, server and client
certificates); the senders use ``storescu +tls``, the sidecar listens with
``--tls-cert/--tls-key/--tls-ca`` (mutual TLS) and sends over TLS to
``storescp +tls``. ``--dicomweb``: the receiving PACS is a real Orthanc with
its DICOMweb plugin (basic auth, credentials in ``--dicomweb-auth-file``),
reached by STOW-RS through a loopback relay that keeps every request body
(Orthanc keeps one copy per SOP Instance UID, so repeats and conflicts are
counted from what was sent); Orthanc is stopped for the outage, and the
results counted are those Orthanc holds at the end.

After the senders are done it waits (at most ``--drain`` s) for the results
and prints: series sent, results expected (5 per series: SEG, three maps, SR),
delivered (objects that cover the whole series), lost, ``extra_partial``
(results for a part of a series: a sender cut off mid-series by a kill whose
acknowledged part was processed alone), duplicates with identical bytes,
conflicting objects (one SOP Instance UID, different content), how many
``storescu`` runs failed and were repeated (the sidecar was down or killed
mid-association) and latency
from the sender's last acknowledged instance to the last whole-series result
(p50/p95, seconds). Goal: 0 lost, 0 conflicting.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dicom_peers import free_port, phantom, sent, storescu, wait_port, write_ct_series  # noqa: E402
from tests.dicomweb_peers import PASSWORD, USER, OrthancWeb, Relay, dicom_part  # noqa: E402
from tests.tls_peers import PKI, make_pki, storescu_tls, tls_args  # noqa: E402

KINDS = 5  # SEG, TU, AU, EU maps, SR


@dataclass
class Process:
    """A restartable subprocess writing to one log."""

    cmd: list[str]
    log: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                self.cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_port(self.port, timeout=120)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


class WebPacs:
    """Orthanc with DICOMweb behind a recording relay; stopped and started like a Process."""

    def __init__(self, work: Path) -> None:
        self.orthanc = OrthancWeb(work / "orthanc", auth=True)
        self.relay: Relay | None = None
        self.synced = 0

    def start(self) -> None:
        self.orthanc.__enter__()
        if self.relay is None:
            self.relay = Relay(self.orthanc.url, hold=False)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        self.orthanc.__exit__()

    def sync(self, received: Path) -> None:
        """Every object Orthanc answered 200 to, into ``received`` (one file per request,
        repeats included, dated when stored): what storescp ``+uf`` keeps in DIMSE mode."""
        assert self.relay is not None
        answers = self.relay.answers[self.synced :]
        for i, (t, body, status) in enumerate(answers, start=self.synced):
            if status == 200:
                path = received / f"stow{i:06d}.dcm"
                path.write_bytes(dicom_part(body))
                os.utime(path, (t, t))
        self.synced += len(answers)

    def holds(self) -> int:
        """Objects other than the CT images that Orthanc holds (one per SOP Instance UID)."""
        tags = [
            self.orthanc.get(f"/instances/{i}/simplified-tags")
            for i in self.orthanc.get("/instances")
        ]
        return sum(t.get("Modality") != "CT" for t in tags)


@dataclass
class Soak:
    args: argparse.Namespace
    work: Path
    rng: random.Random
    sent_at: dict[str, float] = field(default_factory=dict)  # series UID -> last ack time
    slices: dict[str, int] = field(default_factory=dict)
    resends: int = 0  # storescu runs that failed (sidecar down or killed mid-series)
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pki: PKI | None = None  # --tls

    def push(self, files: list[Path], port: int) -> bool:
        """One storescu association with every file; True when all were stored."""
        if self.pki is None:
            return sent(storescu(files, port, called_ae="UQSOAK", calling_ae="MODALITY"))
        tls = tls_args(self.pki.client_cert, self.pki.client_key, self.pki.ca)
        return sent(storescu_tls(files, port, called_ae="UQSOAK", calling_ae="MODALITY", tls=tls))

    def note(self, what: str) -> None:
        with self.lock:
            self.events.append({"t": round(time.monotonic() - T0, 1), "event": what})


T0 = time.monotonic()


def make_series(work: Path, n: int, slices: int, size: int) -> list[tuple[str, list[Path]]]:
    out = []
    for i in range(n):
        syn = write_ct_series(
            work / f"series{i:03d}", phantom((size, size, slices), seed=i), seed=i
        )
        out.append((syn.series_uid, syn.files))
    return out


def sender(
    soak: Soak, port: int, series: list[tuple[float, str, list[Path]]], deadline: float
) -> None:
    """Send each series at its planned moment (seconds after start), retrying it whole."""
    for at, uid, files in series:
        time.sleep(max(0.0, T0 + at - time.monotonic()))
        while time.monotonic() < deadline:
            if soak.push(files, port):
                with soak.lock:
                    soak.sent_at[uid] = time.time()
                    soak.slices[uid] = len(files)
                break
            with soak.lock:
                soak.resends += 1
            time.sleep(1.0)  # the sidecar is down or was killed mid-association


def chaos(soak: Soak, sidecar: Process, pacs: Process, stop: threading.Event) -> None:
    """Kill and restart the sidecar ``--kills`` times, stop the PACS once, at seeded moments."""
    a = soak.args
    window = a.duration * 0.7
    kills = sorted(soak.rng.uniform(5.0, window) for _ in range(a.kills))
    plan = [(t, "kill") for t in kills] + [(soak.rng.uniform(5.0, window), "pacs")]
    for t, what in sorted(plan):
        if stop.wait(max(0.0, T0 + t - time.monotonic())):
            return
        if what == "kill":
            sidecar.kill()
            soak.note("sidecar SIGKILL")
            time.sleep(soak.rng.uniform(0.5, 2.0))
            sidecar.start()
            soak.note("sidecar restarted")
        else:
            pacs.kill(signal.SIGTERM)
            soak.note(f"PACS stopped for {a.pacs_down} s")
            if stop.wait(a.pacs_down):
                pacs.start()
                return
            pacs.start()
            soak.note("PACS restarted")


def _body(path: Path) -> bytes:
    """The data set bytes of a Part 10 file, without preamble and file meta (the
    receiver writes its own meta)."""
    raw = path.read_bytes()
    meta = pydicom.filereader.read_file_meta_info(path)
    return raw[128 + 4 + 12 + int(meta.FileMetaInformationGroupLength) :]


def _covers(ds: pydicom.Dataset) -> tuple[str, int]:
    """(source series UID, how many source images) an output covers."""
    if ds.Modality == "SR":
        refs = [
            s
            for ev in ds.CurrentRequestedProcedureEvidenceSequence
            for s in ev.ReferencedSeriesSequence
            if any("Image" in str(i.ReferencedSOPClassUID.name) for i in s.ReferencedSOPSequence)
        ]
        return str(refs[0].SeriesInstanceUID), len(refs[0].ReferencedSOPSequence)
    series = ds.ReferencedSeriesSequence[0]
    return str(series.SeriesInstanceUID), int(ds.NumberOfFrames)


def tally(soak: Soak, received: Path) -> dict[str, Any]:
    by_uid: dict[str, list[Path]] = {}
    incomplete = 0  # being written, or cut off when the PACS was stopped
    for f in sorted(received.iterdir()):
        try:
            uid = str(pydicom.dcmread(f).SOPInstanceUID)
        except Exception:
            incomplete += 1
            continue
        by_uid.setdefault(uid, []).append(f)
    duplicates = conflicts = extra = 0
    whole: dict[str, list[float]] = {}
    for files in by_uid.values():
        bodies = {_body(f) for f in files}
        duplicates += len(files) - 1 if len(bodies) == 1 else 0
        conflicts += len(bodies) > 1
        ds = pydicom.dcmread(files[0])
        series_uid, covered = _covers(ds)
        if covered == soak.slices.get(series_uid):
            whole.setdefault(series_uid, []).append(min(f.stat().st_mtime for f in files))
        else:
            extra += 1
    expected = KINDS * len(soak.sent_at)
    delivered = sum(min(len(v), KINDS) for k, v in whole.items() if k in soak.sent_at)
    latencies = [
        max(whole[uid]) - t for uid, t in soak.sent_at.items() if len(whole.get(uid, [])) >= KINDS
    ]
    pct = (lambda q: round(float(np.percentile(latencies, q)), 2)) if latencies else None
    return {
        "series_sent": len(soak.sent_at),
        "results_expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "extra_partial": extra,
        "duplicates_identical": duplicates,
        "conflicting": conflicts,
        "unreadable_files": incomplete,
        "latency_s": {"p50": pct(50), "p95": pct(95)} if pct else None,
    }


def wait_drained(soak: Soak, received: Path, deadline: float, pacs: Any) -> None:
    while time.monotonic() < deadline:
        if isinstance(pacs, WebPacs):
            pacs.sync(received)
        if tally(soak, received)["lost"] == 0:
            return
        time.sleep(2.0)


def receiver(a: argparse.Namespace, work: Path, received: Path, pki: PKI | None) -> tuple[Any, Any]:
    """The receiving PACS, and (called after it started) the sidecar's --send-to options."""
    if a.dicomweb:
        web = WebPacs(work)
        auth = work / "dicomweb-auth"
        auth.write_text(f"Basic {USER}:{PASSWORD}\n")
        auth.chmod(0o600)

        def web_send_to() -> list[str]:
            assert web.relay is not None
            return ["--send-to", f"{web.relay.url}/dicom-web", "--dicomweb-auth-file", str(auth)]

        return web, web_send_to
    pacs_port = free_port()
    tls = tls_args(pki.server_cert, pki.server_key, pki.ca) if pki is not None else []
    storescp = [
        "storescp",
        "-aet",
        "PACS",
        "-od",
        str(received),
        "+uf",
        *tls,
        "-pm",
        str(pacs_port),
    ]
    pacs = Process(storescp, work / "pacs.log", pacs_port)
    return pacs, lambda: ["--send-to", f"PACS@127.0.0.1:{pacs_port}"]


def run(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    soak = Soak(a, work, random.Random(a.seed))
    soak.pki = make_pki(work / "pki") if a.tls else None
    received = work / "pacs"
    received.mkdir()
    port = free_port()
    pacs, send_to = receiver(a, work, received, soak.pki)
    pacs.start()  # first: the relay's address is the DICOMweb --send-to
    sidecar_cmd = [
        sys.executable, "-c", "from uqserve.cli import app; app()", "sidecar",
        "--listen", f"127.0.0.1:{port}", "--ae-title", "UQSOAK", "--allow", "MODALITY",
        *send_to(), "--spool", str(work / "spool"),
        "--stable-seconds", str(a.stable), "--retry-seconds", "1", "--max-attempts", "12",
        "--seed", "1", "--device", "cpu", *(["--bundle", a.bundle] if a.bundle else []),
    ]  # fmt: skip
    if soak.pki is not None:
        pki = soak.pki
        sidecar_cmd += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                        "--tls-ca", str(pki.ca)]  # fmt: skip
    sidecar = Process(sidecar_cmd, work / "sidecar.log", port)
    series = make_series(work / "ct", a.series, a.slices, a.size)
    sidecar.start()
    stop = threading.Event()
    deadline = T0 + a.duration
    # Traffic spread over the chaos window, so kills and the outage hit series in flight.
    starts = sorted(soak.rng.uniform(2.0, a.duration * 0.7) for _ in series)
    planned = [(t, uid, files) for t, (uid, files) in zip(starts, series, strict=True)]
    shares = [planned[i :: a.senders] for i in range(a.senders)]
    threads = [threading.Thread(target=sender, args=(soak, port, s, deadline)) for s in shares]
    monkey = threading.Thread(target=chaos, args=(soak, sidecar, pacs, stop))
    for t in (*threads, monkey):
        t.start()
    for t in threads:
        t.join()
    monkey.join()  # every planned kill and the outage happen, even if senders finish early
    stop.set()
    wait_drained(soak, received, time.monotonic() + a.drain, pacs)
    sidecar.kill(signal.SIGTERM)
    if isinstance(pacs, WebPacs):
        pacs.sync(received)
        result = {**tally(soak, received), "archive_holds": pacs.holds()}
        if pacs.relay is not None:
            result["stow_requests"] = len(pacs.relay.bodies)
            pacs.relay.close()
    else:
        result = tally(soak, received)
    pacs.kill(signal.SIGTERM)
    kills = sum(e["event"] == "sidecar SIGKILL" for e in soak.events)
    return {
        **result,
        "series_planned": a.series,
        "sidecar_kills": kills,
        "sender_failed_attempts": soak.resends,
        "events": soak.events,
        "seconds": round(time.monotonic() - T0, 1),
        "config": {k: v for k, v in vars(a).items() if k != "keep"},
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--senders", type=int, default=3)
    p.add_argument("--series", type=int, default=12)
    p.add_argument("--slices", type=int, default=6)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--duration", type=float, default=150.0, help="sending window, s")
    p.add_argument("--drain", type=float, default=120.0, help="wait for results after, s")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--pacs-down", type=float, default=15.0)
    p.add_argument("--stable", type=float, default=2.0, help="--stable-seconds of the sidecar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", default=None, help="default: the shipped softmax-ensemble")
    p.add_argument("--tls", action="store_true", help="DICOM TLS in and out (openssl-made PKI)")
    p.add_argument("--dicomweb", action="store_true", help="deliver by STOW-RS to Orthanc")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, spool)")
    a = p.parse_args(argv)
    if a.bundle is None:
        a.bundle = "softmax-ensemble"
    work = Path(tempfile.mkdtemp(prefix="uqserve-soak-"))
    try:
        print(json.dumps(run(a, work), indent=2))
    finally:
        if a.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
