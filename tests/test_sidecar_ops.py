"""Operating the sidecar: /healthz, /readyz, Prometheus /metrics and JSON logs.

Real peers on loopback: dcmtk's ``storescu`` sends, a pynetdicom Storage SCP
receives, the endpoints are read over real HTTP and the exposition parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dicom_peers import (
    PATIENT_ID,
    PATIENT_NAME,
    free_port,
    phantom,
    require,
    sent,
    storescu,
    write_ct_series,
)
from tests.test_sidecar_faults import CLI, RecordingSCP, _listening, _start_cli, _stop
from uqserve.sidecar import BundlePredictor, Peer, Sidecar, SidecarConfig, series_key

pytestmark = pytest.mark.dicom


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(port: int) -> dict[str, float]:
    """Every sample of /metrics as ``name{label=value,...}`` -> value."""
    status, text = _get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_follow_a_series_from_arrival_to_delivery(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3), seed=5))
    receiver = RecordingSCP(hold=False)
    kw = {
        "send_to": Peer("RECEIVER", "127.0.0.1", receiver.port),
        "metrics": ("127.0.0.1", 0),
    }
    config = SidecarConfig(spool=tmp_path / "spool", ae_title="UQSIDECAR", host="127.0.0.1",
                           port=0, allow_any=True, **kw)  # fmt: skip
    try:
        sc = Sidecar(config, BundlePredictor(str(tiny_bundle), seed=1, device="cpu"))
        sc.start(worker=False)  # the test steps the worker with run_once
        try:
            assert sc.metrics_server is not None
            port = sc.metrics_server.port
            assert _get(port, "/healthz") == (200, "ok\n")
            assert _get(port, "/readyz") == (
                503,
                "not ready: the in-process runtime is not loaded yet\n",
            )
            sc.predictor.open()  # type: ignore[attr-defined]
            assert _get(port, "/readyz") == (200, "ok\n")
            assert _get(port, "/nothing")[0] == 404
            before = _samples(port)
            assert before["uqserve_sidecar_queue_depth"] == 0
            assert before["uqserve_sidecar_series_completed_total{outcome=delivered}"] == 0
            assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR", calling_ae="MOD7"))
            mid = _samples(port)
            assert mid["uqserve_sidecar_instances_received_total"] == 3
            assert mid["uqserve_sidecar_queue_depth"] == 1
            assert sc.run_once(now=time.time() + 7200) == [
                (series_key(syn.series_uid), "delivered")
            ]
            after = _samples(port)
            _, text = _get(port, "/metrics")
        finally:
            sc.stop()
    finally:
        receiver.close()
    assert after["uqserve_sidecar_series_received_total"] == 1
    assert after["uqserve_sidecar_series_completed_total{outcome=delivered}"] == 1
    assert after["uqserve_sidecar_series_failed_total{kind=permanent}"] == 0
    assert after["uqserve_sidecar_results_delivered_total{protocol=dimse}"] == 5
    assert after["uqserve_sidecar_results_dead_lettered_total"] == 0
    assert after["uqserve_sidecar_prediction_seconds_count"] == 1
    assert after["uqserve_sidecar_delivery_seconds_count"] == 1
    assert after["uqserve_sidecar_queue_depth"] == 0
    assert after["uqserve_sidecar_in_flight"] == 0
    assert "uqserve_sidecar_ood_flags_total" in after
    assert all(name.startswith("uqserve_") for name in after)
    # No identifier, UID or AE title anywhere in the exposition, labels included.
    for secret in (PATIENT_NAME, PATIENT_ID, syn.series_uid, syn.study_uid, "MOD7", "RECEIVER"):
        assert secret not in text
    assert "UQSIDECAR" not in text
    # Stopped with the sidecar.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_failures_are_counted_by_kind(tmp_path: Path, tiny_bundle: Path) -> None:
    require("storescu")
    good = write_ct_series(tmp_path / "good", phantom((16, 16, 3)))
    bad = write_ct_series(tmp_path / "bad", phantom((16, 16, 3)), seed=1)
    ds = pydicom.dcmread(bad.files[1])
    ds.PixelData = ds.PixelData[:100]  # truncated: fails at once, never retried
    ds.save_as(bad.files[1])
    unreachable = Peer("NOBODY", "127.0.0.1", free_port())
    kw = {"send_to": unreachable, "send_retries": 0}
    with _listening(tmp_path, tiny_bundle, **kw) as sc:
        assert sent(storescu(good.files + bad.files, sc.port, called_ae="UQSIDECAR"))
        outcomes = dict(sc.run_once(now=time.time() + 60))
        counted = sc.metrics.series_failed
    assert sorted(outcomes.values()) == ["failed", "retry"]  # bad: permanent; peer down: transient
    assert counted.labels("permanent")._value.get() == 1
    assert counted.labels("transient")._value.get() == 1


def test_readyz_is_not_ready_while_the_triton_server_is_unreachable(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = SidecarConfig(
        allow_any=True, spool=tmp_path / "spool", host="127.0.0.1", port=0, metrics=("127.0.0.1", 0)
    )
    sc = Sidecar(config, BundlePredictor(str(tiny_bundle), [down], device="cpu"))
    sc.start()
    try:
        assert sc.metrics_server is not None
        code, body = _get(sc.metrics_server.port, "/readyz")
        assert _get(sc.metrics_server.port, "/healthz") == (200, "ok\n")
    finally:
        sc.stop()
    assert (code, body) == (503, f"not ready: no Triton server answers ({down})\n")


def test_json_logs_and_probes_from_the_command_line(tmp_path: Path, tiny_bundle: Path) -> None:
    require("storescu")
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3), seed=9))
    port, metrics_port, log = free_port(), free_port(), tmp_path / "sidecar.log"
    args = [
        "--ae-title", "UQSIDECAR", "--spool", str(tmp_path / "spool"), "--stable-seconds", "0.5",
        "--bundle", str(tiny_bundle), "--seed", "3", "--device", "cpu", "--allow-any",
        "--metrics", f"127.0.0.1:{metrics_port}", "--log-format", "json", "--verbose",
    ]  # fmt: skip
    key = series_key(syn.series_uid)
    proc = _start_cli(args, port, log)
    try:
        assert _get(metrics_port, "/readyz") == (200, "ok\n")
        assert sent(storescu(syn.files, port, called_ae="UQSIDECAR"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and f"series {key} written" not in log.read_text():
            time.sleep(0.2)
        completed = _samples(metrics_port)[
            "uqserve_sidecar_series_completed_total{outcome=written}"
        ]
    finally:
        _stop(proc)
    assert completed == 1
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "event"} <= set(r) for r in lines)
    (done,) = [r for r in lines if r["event"].startswith(f"series {key} written")]
    assert done["series"] == key and done["level"] == "info" and done["duration_s"] > 0
    text = log.read_text()
    for secret in (PATIENT_NAME, PATIENT_ID, syn.series_uid, syn.study_uid):
        assert secret not in text


def test_a_taken_metrics_port_is_refused_in_one_line(tmp_path: Path, tiny_bundle: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proc = subprocess.run(
            [*CLI, "--listen", f"127.0.0.1:{free_port()}", "--spool", str(tmp_path / "s"),
             "--bundle", str(tiny_bundle), "--device", "cpu", "--metrics", f"127.0.0.1:{busy}",
             "--allow-any"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert proc.returncode != 0, proc.stderr
    assert f"--metrics 127.0.0.1:{busy}: cannot listen" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_kubernetes_deployment_probes_the_metrics_endpoint() -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    docs = list(yaml.safe_load_all((root / "deploy/kubernetes/sidecar.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (metrics_arg,) = [a for a in container["args"] if a.startswith("--metrics=")]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert metrics_arg.endswith(f":{port}")
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_an_unknown_log_format_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CLI, "--spool", str(tmp_path / "s"), "--allow-any", "--log-format", "xml"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--log-format 'xml': use one of text, json" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.triton
def test_readyz_follows_a_real_triton_server_going_away(tmp_path: Path, tiny_bundle: Path) -> None:
    from tests._triton import HAVE_SERVER
    from uqserve.serving import TritonServer, write_repository

    if not HAVE_SERVER:
        pytest.skip("tritonserver (server extra) is not installed")
    repo = write_repository(tiny_bundle, tmp_path / "repo", instances=1)
    config = SidecarConfig(
        allow_any=True, spool=tmp_path / "spool", host="127.0.0.1", port=0, metrics=("127.0.0.1", 0)
    )
    with TritonServer(repo) as srv:
        predictor = BundlePredictor(str(tiny_bundle), [srv.grpc_url], device="cpu")
        predictor.open()  # what the CLI does before listening: the served model is checked
        sc = Sidecar(config, predictor)
        sc.start(worker=False)
        assert sc.metrics_server is not None
        port = sc.metrics_server.port
        try:
            assert _get(port, "/readyz") == (200, "ok\n")
            srv.stop()  # the server goes away under a running sidecar
            code, body = _get(port, "/readyz")
            assert _get(port, "/healthz") == (200, "ok\n")
        finally:
            sc.stop()
    assert code == 503 and "no Triton server answers" in body


def test_ood_flags_are_counted(tmp_path: Path) -> None:
    require("storescu")
    from tests._bundles import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "strict-bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["ood"]["threshold"] = 1e-6  # every scan is out of distribution for this bundle
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    syn = write_ct_series(tmp_path / "ct", phantom((16, 16, 3), seed=3))
    with _listening(tmp_path, bundle) as sc:
        assert sent(storescu(syn.files, sc.port, called_ae="UQSIDECAR"))
        assert sc.run_once(now=time.time() + 60)[0][1] == "written"
        flags = sc.metrics.ood_flags._value.get()
    record = sc.spool.done_record(series_key(syn.series_uid))
    assert record is not None and record["ood_flag"] is True and flags == 1
