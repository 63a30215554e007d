"""The sidecar: receive a series, predict once it is complete, send the results.

One process runs the Storage SCP (its own threads) and one worker thread. The
worker polls the spool; a series whose newest instance is ``stable_seconds``
old is claimed, read (:func:`uqserve.volumes.dicom.read_series`), predicted
(:func:`uqserve.predict_volume`), turned into DICOM results
(:mod:`uqserve.sidecar.outputs`) and sent with C-STORE. Failures never stop
the listener:

* permanent (malformed or incomplete series, unsupported modality, images
  highdicom refuses; any :class:`~uqserve.errors.UsageError`): the series
  moves to ``failed/`` with the reason, without retries;
* transient (the model server is down, the disk is full, the PACS is
  unreachable, anything unexpected): retried after
  ``retry_base_s * 2**(attempt-1)`` seconds (at most an hour) up to
  ``max_attempts``, then failed with the last reason; results already built
  are kept in ``out/`` between tries, and only those not yet stored are sent;
* results the PACS refuses, or still cannot take after the last try, go to
  ``dead-letter/`` with the reason.

Logs name series by a hash of the Series Instance UID only: never patient
names, IDs, birth dates or UIDs, and never a library's message text
(:mod:`uqserve.sidecar._privacy`).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uqserve._version import __version__
from uqserve.errors import ServiceError, UqserveError, UsageError
from uqserve.sidecar._privacy import describe, guard_logs, traceback_lines
from uqserve.sidecar.config import SidecarConfig
from uqserve.sidecar.dicomweb import WebPeer, stow_files
from uqserve.sidecar.metrics import MetricsServer, SidecarMetrics
from uqserve.sidecar.outputs import (
    OutputOptions,
    SourceFrames,
    build_outputs,
    sanitize_sources,
    write_datasets,
)
from uqserve.sidecar.predictor import BundlePredictor, PredictionLike
from uqserve.sidecar.scp import StorageSCP
from uqserve.sidecar.sender import SendResult, dead_letter, send_files
from uqserve.sidecar.spool import SeriesState, Spool, instances_digest
from uqserve.volumes import Volume, VolumeError
from uqserve.volumes.dicom import read_series

__all__ = ["BundlePredictor", "PeerUnavailable", "PermanentError", "Sidecar", "SidecarConfig"]

log = logging.getLogger("uqserve.sidecar")


class PermanentError(UsageError):
    """A series that will never succeed as sent (retrying cannot help)."""


class PeerUnavailable(ServiceError):
    """The receiving PACS could not be reached for some results: retry the series later."""


# Modality values shown in logs: plain codes only (a hostile value could hold anything).
_SAFE_MODALITY = re.compile(r"[A-Z0-9_ ]{0,16}")


class Sidecar:
    """The running sidecar: ``start()``, then ``stop()`` (or use as a context manager)."""

    def __init__(
        self, config: SidecarConfig, predictor: Callable[[Volume], PredictionLike]
    ) -> None:
        guard_logs()
        self.config = config
        self.predictor = predictor
        self.spool = Spool(config.spool)
        self.scp = StorageSCP(
            self.spool,
            ae_title=config.ae_title,
            host=config.host,
            port=config.port,
            allow=config.allow,
            modalities=config.modalities,
            on_store=self._stored,
            on_unsupported=self._unsupported,
            limits=config.limits,
            ssl_context=config.tls.server_context() if config.tls else None,
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        # Series held back after a spool write failed: key -> (not before, tries).
        self._held: dict[str, tuple[float, int]] = {}
        self._failed_passes = 0
        self.metrics = SidecarMetrics(lambda: len(self.spool.pending()))
        self.metrics_server: MetricsServer | None = None

    @property
    def port(self) -> int:
        return self.scp.port

    def __enter__(self) -> Sidecar:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, worker: bool = True) -> None:
        """Listen, serve the metrics (``config.metrics``) and start the worker thread
        (``worker=False``: the caller steps :meth:`run_once` itself)."""
        pending = self.spool.pending()
        if pending:
            log.info("resuming %d unfinished series from the spool", len(pending))
        self._open_metrics()  # before the listener: a taken port leaves nothing running
        self.scp.start()
        self._stop.clear()
        if worker:
            self._worker = threading.Thread(
                target=self._loop, name="uqserve-sidecar-worker", daemon=True
            )
            self._worker.start()
        if self.metrics_server is not None:
            self.metrics_server.start()

    def _open_metrics(self) -> None:
        if self.config.metrics is None or self.metrics_server is not None:
            return
        host, port = self.config.metrics
        try:
            self.metrics_server = MetricsServer(
                host, port, self.metrics, alive=self.alive, ready=self.ready
            )
        except OSError as exc:
            raise UsageError(
                f"metrics address {host}:{port}: cannot listen ({exc.strerror or exc}); "
                "choose a free port"
            ) from exc

    def alive(self) -> str | None:
        """Why the sidecar is not alive (its worker thread is gone), or None."""
        if self._worker is not None and not self._worker.is_alive():
            return "the worker thread has stopped"
        return None

    def ready(self) -> str | None:
        """Why the sidecar cannot take series now, or None: the listener is up and the
        model can predict (``predictor.ready()``, when the predictor has one)."""
        if self.scp._server is None or self._stop.is_set():
            return "the DICOM listener is not up"
        check = getattr(self.predictor, "ready", None)
        return check() if callable(check) else None

    def _stored(self, key: str) -> None:
        self.metrics.instances_received.inc()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self.scp.stop()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        close = getattr(self.predictor, "close", None)
        if callable(close):
            close()

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler, say)."""
        while not self._stop.wait(1.0):
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._pass())
            self._wake.clear()

    def _pass(self) -> float:
        """One worker pass; the seconds to wait before the next: ``poll_s``, doubling
        after each failed pass up to a minute (a lasting fault is not logged every poll)."""
        try:
            self.run_once()
        except Exception as exc:  # a bug must not kill the worker; the series stays spooled
            self._failed_passes += 1
            delay = min(self.config.poll_s * 2**self._failed_passes, 60.0)
            log.error(
                "worker pass failed: %s at %s; next pass in %.1f s",
                describe(exc),
                traceback_lines(exc.__traceback__),
                delay,
            )
            return delay
        self._failed_passes = 0
        return self.config.poll_s

    def _unsupported(self, key: str, reason: str) -> None:
        if self.spool.failed_reason(key) is None:
            self.spool.fail(key, reason, SeriesState(key=key))
            log.warning("series %s not processed: %s", key, reason)

    # -- processing -------------------------------------------------------

    def run_once(self, now: float | None = None) -> list[tuple[str, str]]:
        """Process every series that is due; return ``(key, outcome)`` pairs.

        A series whose spool files cannot be written (the disk is full) is held
        back in memory, doubling from ``retry_base_s``: logged once per try, not
        once per poll.
        """
        clock = time.time() if now is None else now
        self.spool.prune_kept(self.config.keep_s, now)
        done = []
        for key in self.spool.ready(self.config.stable_seconds, now):
            if self._stop.is_set():
                break
            if self._held.get(key, (0.0, 0))[0] > clock:
                continue
            try:
                outcome = self.process(key)
            except OSError as exc:  # the spool itself failed: no state file can say so
                outcome = self._hold(key, exc, clock)
            else:
                self._held.pop(key, None)
            done.append((key, outcome))
        return done

    def _hold(self, key: str, exc: OSError, now: float) -> str:
        tries = self._held.get(key, (0.0, 0))[1] + 1
        delay = min(self.config.retry_base_s * 2 ** (tries - 1), 3600.0)
        self._held[key] = (now + delay, tries)
        log.error(
            "series %s: the spool cannot be written (%s); next try in %.0f s",
            key,
            describe(exc),
            delay,
        )
        return "retry"

    def process(self, key: str) -> str:
        """Process one series.

        Returns ``delivered``, ``written``, ``partial`` (some results in
        dead-letter/), ``undelivered`` (all of them there), ``duplicate`` (a
        re-sent part of a finished series, dropped), ``retry`` or ``failed``.
        """
        with self.metrics.processing():
            outcome = self._process_series(key)
        self.metrics.outcome(outcome)
        return outcome

    def _process_series(self, key: str) -> str:
        self.spool.claim(key)
        if self._late_or_repeated(key) == "duplicate":
            return "duplicate"
        state = self.spool.load_state(key)
        state.attempts += 1
        self.spool.save_state(state)  # a crash mid-way still counts as an attempt
        if state.attempts == 1:
            self.metrics.series_received.inc()
        t0 = time.perf_counter()
        try:
            record = self._process(key, state)
        except (VolumeError, UsageError) as exc:  # the input will never work as sent
            return self._give_up(key, state, describe(exc))
        except Exception as exc:
            return self._retry_or_give_up(key, state, exc)
        record["attempts"] = state.attempts
        record["seconds"] = round(time.perf_counter() - t0, 3)
        self.spool.finish(key, record, keep=self.config.keep_s > 0)
        log.info(
            "series %s %s: %d slices, %d result(s) in %.1f s",
            key,
            record["status"],
            record["slices"],
            len(record["outputs"]),
            record["seconds"],
            extra={"series": key, "duration_s": record["seconds"]},
        )
        return str(record["status"])

    def _late_or_repeated(self, key: str) -> str:
        """Instances of a series that was finished before: ``duplicate`` or ``new``.

        A part of it sent again is dropped (results for the whole series are out
        already; a 2-of-8 re-send must not add results for a fragment). Late
        instances are merged with the kept ones, so the series is processed whole
        again (new UIDs: it is a new set of images).
        """
        names = {p.name for p in self.spool.instances(key)}
        kept = self.spool.kept_names(key)
        done = self.spool.done_record(key)
        previous = kept or (set(done.get("instances", [])) if done else set())
        if previous and names < previous:
            self.spool.drop_resend(key, sorted(names))
            log.info(
                "series %s: %d re-sent instance(s) of a finished series dropped", key, len(names)
            )
            return "duplicate"
        if kept and not names <= kept:
            moved = self.spool.merge_kept(key)
            log.info(
                "series %s: %d late instance(s) merged with the %d of the finished series",
                key,
                len(names - kept),
                moved + len(names & kept),
            )
        return "new"

    def _give_up(self, key: str, state: SeriesState, reason: str) -> str:
        state.history.append({"attempt": state.attempts, "error": reason, "time": time.time()})
        self.spool.fail(key, reason, state)
        log.warning("series %s failed: %s", key, reason)
        return "failed"

    def _retry_or_give_up(self, key: str, state: SeriesState, exc: Exception) -> str:
        reason = describe(exc)
        if not isinstance(exc, UqserveError):
            log.debug(
                "series %s: %s raised at %s",
                key,
                type(exc).__name__,
                traceback_lines(exc.__traceback__),
            )
        if state.attempts >= self.config.max_attempts:
            if isinstance(exc, PeerUnavailable):  # results are built: keep them, for an operator
                return self._dead_letter_rest(key, state, reason)
            return self._give_up(
                key, state, f"gave up after {state.attempts} attempts; last error: {reason}"
            )
        state.history.append({"attempt": state.attempts, "error": reason, "time": time.time()})
        state.last_error = reason
        delay = min(self.config.retry_base_s * 2 ** (state.attempts - 1), 3600.0)
        state.next_attempt = time.time() + delay
        self.spool.save_state(state)
        log.warning(
            "series %s: attempt %d of %d failed (%s); retrying in %.0f s",
            key,
            state.attempts,
            self.config.max_attempts,
            reason,
            delay,
        )
        return "retry"

    def _dead_letter_rest(self, key: str, state: SeriesState, reason: str) -> str:
        record = dict(state.record)
        out = self.spool.out_dir(key)
        reason = f"{reason}; gave up after {state.attempts} attempts"
        rest = {p: reason for p in sorted(out.glob("*.dcm"))}
        dead_letter(rest, self.spool.dead_letter_dir(key))
        self.metrics.results_dead_lettered.inc(len(rest))
        record["dead_letter"] = {
            **record.get("dead_letter", {}),
            **{p.name: why for p, why in rest.items()},
        }
        record["status"] = "partial" if record.get("sent") else "undelivered"
        record["attempts"] = state.attempts
        record["instances"] = [p.name for p in self.spool.instances(key)]
        self.spool.finish(key, record, keep=self.config.keep_s > 0)
        log.error(
            "series %s %s: %d result(s) moved to dead-letter/%s after %d attempts (%s)",
            key,
            record["status"],
            len(rest),
            key,
            state.attempts,
            reason,
        )
        return str(record["status"])

    def _process(self, key: str, state: SeriesState) -> dict[str, Any]:
        files = self.spool.instances(key)
        if not files:
            raise PermanentError(f"series {key}: no instances in the spool")
        names = [p.name for p in files]
        digest = instances_digest(files)
        out = self.spool.out_dir(key)
        if state.built != digest or not out.is_dir():
            # New, or instances arrived since the results were built: build (again).
            state.built, state.record = None, {}
            self.spool.save_state(state)
            try:
                state.record = self._build(key, files, out)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)  # no partial results left behind
                raise
            state.built = digest
            self.spool.save_state(state)
        record = dict(state.record)
        record["instances"] = names
        if self.config.send_to is None:
            record["status"] = "written"
            record["folder"] = str(out)
            return record
        return self._send(key, state, record)

    def _build(self, key: str, files: list[Path], out: Path) -> dict[str, Any]:
        """Read, predict and write the results into ``out``; return what the record needs."""
        series = read_series(files, name=f"series {key}")
        modality = series.modality.upper()
        if modality not in self.config.modalities:
            shown = modality if _SAFE_MODALITY.fullmatch(modality) else "unreadable"
            raise PermanentError(
                f"series {key}: unsupported modality {shown or 'none'!r}; "
                f"the sidecar processes {', '.join(self.config.modalities)} series"
            )
        log.info(
            "series %s: %s, %s voxels, predicting",
            key,
            modality,
            "x".join(map(str, series.volume.shape)),
        )
        with self.metrics.prediction_seconds.time():
            pred = self.predictor(series.volume)
        report = dict(pred.report)
        bundle = report.get("bundle", {}) if isinstance(report.get("bundle"), dict) else {}
        classes = bundle.get("classes") or [f"class {k}" for k in range(pred.prob.shape[0])]
        sha = str(bundle.get("manifest_sha256", ""))
        options = self.config.outputs
        if bundle.get("name"):
            options = OutputOptions(
                **{
                    **options.__dict__,
                    "model_name": str(bundle["name"]),
                    "model_version": f"uqserve {__version__}; bundle {sha[:12]}",
                }
            )
        try:
            datasets = build_outputs(
                series.datasets,
                seg=pred.seg,
                maps={"tu": pred.tu, "au": pred.au, "eu": pred.eu},
                prob=pred.prob,
                classes=classes,
                key=f"{sha}:{report.get('seed')}",
                report=report,
                options=options,
                frames=SourceFrames.of(series),
            )
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            # highdicom refusing these images: the same images will be refused again.
            raise PermanentError(
                f"series {key}: results cannot be built from these images "
                f"({type(exc).__name__} in highdicom; details withheld: they may quote tag values)"
            ) from exc
        _, omitted = sanitize_sources(series.datasets)
        if omitted:
            log.warning(
                "series %s: invalid %s in the source images left empty in the results",
                key,
                ", ".join(omitted),
            )
        shutil.rmtree(out, ignore_errors=True)
        paths = write_datasets(datasets, out)
        ood = report.get("ood")
        ood = ood if isinstance(ood, dict) else {}
        if ood.get("flag") is True:
            self.metrics.ood_flags.inc()
        return {
            "modality": modality,
            "slices": int(series.volume.shape[2]),
            "outputs": [p.name for p in paths],
            "omitted_attributes": omitted,
            "ood_flag": ood.get("flag"),
            "sent": [],
            "dead_letter": {},
        }

    def _deliver(self, paths: list[Path], stored: Callable[[Path], None]) -> SendResult:
        """C-STORE or STOW-RS ``paths`` to ``config.send_to``, with the same retries."""
        peer, tls = self.config.send_to, self.config.tls
        common: dict[str, Any] = {
            "retries": self.config.send_retries,
            "backoff_s": self.config.send_backoff_s,
            "sleep": self._stop.wait,  # SIGTERM ends the back-off; the series is resumed later
            "on_sent": stored,
            "tls": tls.client_context() if tls else None,
        }
        if isinstance(peer, WebPeer):
            return stow_files(paths, peer, auth=self.config.web_auth, **common)
        assert peer is not None
        return send_files(paths, peer, calling_ae=self.config.ae_title, **common)

    def _send(self, key: str, state: SeriesState, record: dict[str, Any]) -> dict[str, Any]:
        """Send what is left in out/<key>; each result is deleted once the peer stored it.

        A result the peer refuses (a failure status) goes to dead-letter/ at once;
        an unreachable peer raises :class:`PeerUnavailable`, and the series is retried.
        """
        peer = self.config.send_to
        assert peer is not None
        paths = sorted(self.spool.out_dir(key).glob("*.dcm"))
        sent: list[str] = record["sent"]

        def stored(path: Path) -> None:  # gone from out/ as soon as the peer has it
            sent.append(path.name)
            path.unlink(missing_ok=True)
            self.metrics.results_delivered.labels(protocol).inc()

        protocol = "dicomweb" if isinstance(peer, WebPeer) else "dimse"
        with self.metrics.delivery_seconds.time():
            result = self._deliver(paths, stored)
        refused = {p: why for p, why in result.failed.items() if p in result.refused}
        if refused:
            dead_letter(refused, self.spool.dead_letter_dir(key))
            self.metrics.results_dead_lettered.inc(len(refused))
            record["dead_letter"] = {
                **record["dead_letter"],
                **{p.name: w for p, w in refused.items()},
            }
            log.error(
                "series %s: %d result(s) refused by %s, moved to dead-letter/%s",
                key,
                len(refused),
                peer,
                key,
            )
        state.record = {k: v for k, v in record.items() if k != "instances"}
        self.spool.save_state(state)
        unreached = len(result.failed) - len(refused)
        if unreached:
            why = next(w for p, w in result.failed.items() if p not in refused)
            raise PeerUnavailable(f"{unreached} result(s) not stored by {peer}: {why}")
        if record["dead_letter"]:
            record["status"] = "partial" if sent else "undelivered"
        else:
            record["status"] = "delivered"
        record["sent_to"] = str(peer)
        return record
