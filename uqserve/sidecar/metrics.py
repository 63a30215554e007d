"""Health, readiness and Prometheus metrics of the sidecar (``--metrics HOST:PORT``).

:class:`SidecarMetrics` holds the counters, gauges and histograms (prometheus_client,
one registry per sidecar); :class:`MetricsServer` serves them over HTTP with
the two probes:

* ``GET /healthz``: 200 while the process and its worker thread are alive;
* ``GET /readyz``: 200 once the DICOM listener is up and the model can predict
  (the runtime is loaded; with Triton, a server answers); else 503 and why;
* ``GET /metrics``: the Prometheus text format.

Labels hold fixed words only (an outcome, a failure kind, a protocol): never a
patient attribute, a UID or an AE title.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

__all__ = ["MetricsServer", "SidecarMetrics"]

log = logging.getLogger("uqserve.sidecar")

OUTCOMES = ("delivered", "written", "partial", "undelivered", "duplicate")
PROTOCOLS = ("dimse", "dicomweb")
# Seconds: a small CPU model takes ~1 s, a large one on a busy node minutes.
_PREDICT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_DELIVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class SidecarMetrics:
    """Everything the sidecar counts; ``queue_depth()`` is read at each scrape."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.instances_received = Counter(
            "uqserve_sidecar_instances_received", "Instances spooled and acknowledged.", registry=r
        )
        self.series_received = Counter(
            "uqserve_sidecar_series_received",
            "Series taken up for processing (once each, retries not counted).",
            registry=r,
        )
        self.series_completed = Counter(
            "uqserve_sidecar_series_completed",
            "Series finished, by outcome (delivered, written, partial, undelivered, "
            "duplicate: a re-sent part of a finished series, dropped).",
            ["outcome"],
            registry=r,
        )
        self.series_failed = Counter(
            "uqserve_sidecar_series_failed",
            "Series failures: permanent (given up, in failed/) or transient (an attempt "
            "failed and will be retried).",
            ["kind"],
            registry=r,
        )
        self.results_delivered = Counter(
            "uqserve_sidecar_results_delivered",
            "Result objects stored by the receiving peer.",
            ["protocol"],
            registry=r,
        )
        self.results_dead_lettered = Counter(
            "uqserve_sidecar_results_dead_lettered",
            "Result objects moved to dead-letter/ (refused, or undeliverable after the last try).",
            registry=r,
        )
        self.ood_flags = Counter(
            "uqserve_sidecar_ood_flags",
            "Predictions whose scan was flagged out of distribution.",
            registry=r,
        )
        self.queue = Gauge(
            "uqserve_sidecar_queue_depth",
            "Series in the spool not finished yet (arriving, waiting or retrying).",
            registry=r,
        )
        self.queue.set_function(lambda: float(queue_depth()))
        self.in_flight = Gauge(
            "uqserve_sidecar_in_flight", "Series being processed now.", registry=r
        )
        self.prediction_seconds = Histogram(
            "uqserve_sidecar_prediction_seconds",
            "Time to predict one series (seconds).",
            buckets=_PREDICT_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "uqserve_sidecar_delivery_seconds",
            "Time to deliver one series' results, retries within the attempt included (seconds).",
            buckets=_DELIVER_BUCKETS,
            registry=r,
        )
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.series_completed.labels(outcome)
        for kind in ("permanent", "transient"):
            self.series_failed.labels(kind)
        for protocol in PROTOCOLS:
            self.results_delivered.labels(protocol)

    def outcome(self, outcome: str) -> None:
        """Count what :meth:`Sidecar.process` returned."""
        if outcome == "failed":
            self.series_failed.labels("permanent").inc()
        elif outcome == "retry":
            self.series_failed.labels("transient").inc()
        elif outcome in OUTCOMES:
            self.series_completed.labels(outcome).inc()

    @contextlib.contextmanager
    def processing(self) -> Iterator[None]:
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


Probe = Callable[[], "str | None"]  # why not (None: fine)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            probe = self.server.alive if path == "/healthz" else self.server.ready
            why = probe()
            body = b"ok\n" if why is None else f"not {path[1:-1]}: {why}\n".encode()
            self._answer(200 if why is None else 503, body, "text/plain; charset=utf-8")
        else:
            self._answer(404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain")

    def _answer(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: SidecarMetrics, alive: Probe, ready: Probe
    ) -> None:
        super().__init__(address, _Handler)
        self.metrics, self.alive, self.ready = metrics, alive, ready


class MetricsServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``(host, port)`` in a daemon thread.

    ``alive()`` and ``ready()`` return ``None`` when fine, else the reason
    (shown in the 503 body: no identifiers in it).
    """

    def __init__(
        self, host: str, port: int, metrics: SidecarMetrics, *, alive: Probe, ready: Probe
    ) -> None:
        self._httpd = _Server((host, port), metrics, alive, ready)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="uqserve-sidecar-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on http://%s:%d (/healthz, /readyz, /metrics)",
                 self.host, self.port)  # fmt: skip

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
