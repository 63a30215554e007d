"""A durable on-disk spool: received instances, grouped by series, with state.

Layout under the spool root (every name is a hash, never a UID or identifier)::

    incoming/<series>/<instance>.dcm   instances still arriving
    work/<series>/<instance>.dcm       claimed for processing (or waiting to retry)
    work/<series>/state.json           attempts, last error, when to retry
    out/<series>/*.dcm                 results built, not yet delivered
    failed/<series>/                   instances + reason.json of a series given up on
    dead-letter/<series>/              results that could not be sent + *.reason.json
    done/<series>.json                 what was delivered (no identifiers)
    kept/<series>/<instance>.dcm       instances of a finished series, kept a while
                                       so that late ones are merged with them
    tmp/                               partial writes (cleared on start)

An instance is written to ``tmp/``, fsynced, renamed into place and the folder
fsynced *before* the C-STORE is acknowledged, so a crash never loses an
acknowledged instance. A series is ready once no instance has arrived for
``stable_seconds`` (file modification times, so this survives a restart; after
a restart the clock starts no earlier than the restart, so a sender that was
cut off can finish first);
claiming renames the folder, so late arrivals start a new ``incoming`` folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uqserve._fs import atomic_write_text, commit_file, fsync_dir, write_temp_file
from uqserve.errors import UsageError

__all__ = ["SeriesState", "Spool", "instances_digest", "series_key"]

STATE = "state.json"


def series_key(series_uid: str) -> str:
    """The spool name of a series: a hash, safe to show in logs."""
    return hashlib.sha256(str(series_uid).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2), fsync=True)


@dataclass
class SeriesState:
    """Processing state of one series (kept in ``work/<series>/state.json``)."""

    key: str
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # Which set of instances the results in out/<series> were built from
    # (``instances_digest``), and what is known about them so far (slices,
    # outputs, what was sent, what went to dead-letter/): a restart or a retry
    # sends what is left instead of predicting again.
    built: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


def instances_digest(files: list[Path]) -> str:
    """A hash of a set of spooled instances: names (hashes of SOP Instance UIDs), sizes
    and modification times, so an instance received again (new content?) counts as new."""
    parts = []
    for p in sorted(files):
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class Spool:
    """The spool folder; thread-safe for one process (one SCP + one worker)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        # Nothing could arrive while no listener was up: series found on start get a
        # full stable period from when the listener is up (``listening``), so senders
        # can resume first; until then, from now.
        self.opened = time.time()
        self._lock = threading.Lock()
        try:
            for sub in ("incoming", "work", "out", "failed", "dead-letter", "done", "kept", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / "tmp" / f".probe-{os.getpid()}"
            with open(probe, "wb") as f:  # root ignores permission bits: try for real
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            what = (
                "is not a folder"
                if self.root.exists() and not self.root.is_dir()
                else (f"cannot be written ({exc.strerror or type(exc).__name__})")
            )
            raise UsageError(f"spool {self.root} {what}; pass a writable folder as spool") from exc
        for part in (self.root / "tmp").iterdir():  # leftovers of a crash mid-write
            with contextlib.suppress(OSError):
                part.unlink()

    # -- receiving --------------------------------------------------------

    def store(self, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably store one encoded instance (with file meta); return its path."""
        key = series_key(series_uid)
        name = hashlib.sha256(str(sop_uid).encode()).hexdigest()[:20] + ".dcm"
        tmp = write_temp_file(self.root / "tmp", data, fsync=True)
        try:
            with self._lock:  # claiming renames incoming/<series>: not between mkdir and rename
                folder = self.root / "incoming" / key
                new = not folder.is_dir()
                folder.mkdir(exist_ok=True)
                target = commit_file(tmp, folder / name, fsync=True)
                if new:
                    fsync_dir(folder.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    # -- choosing what to process ----------------------------------------

    def pending(self) -> list[str]:
        """Keys of series with instances in ``incoming`` or ``work``."""
        keys = {p.name for p in (self.root / "incoming").iterdir() if p.is_dir()}
        keys |= {p.name for p in (self.root / "work").iterdir() if p.is_dir()}
        return sorted(keys)

    def last_arrival(self, key: str) -> float | None:
        """Modification time of the newest instance in ``incoming/<key>`` (None if none)."""
        folder = self.root / "incoming" / key
        times = []
        with contextlib.suppress(FileNotFoundError):
            for p in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    times.append(p.stat().st_mtime)
        return max(times) if times else None

    def listening(self, now: float | None = None) -> None:
        """The listener is up (now): the stable clock of series found on start starts here."""
        self.opened = time.time() if now is None else now

    def ready(self, stable_seconds: float, now: float | None = None) -> list[str]:
        """Keys due for processing now, oldest first.

        A series in ``incoming`` is due once its newest instance is older than
        ``stable_seconds``; one in ``work`` (claimed before a crash, or waiting
        to retry) once its retry time has come and nothing newer is arriving.
        """
        now = time.time() if now is None else now
        due: list[tuple[float, str]] = []
        for key in self.pending():
            last = self.last_arrival(key)
            if last is not None and now - max(last, self.opened) < stable_seconds:
                continue  # still arriving
            work = self.root / "work" / key
            if work.is_dir() and self.load_state(key).next_attempt > now:
                continue
            due.append((last or 0.0, key))
        return [k for _, k in sorted(due)]

    def claim(self, key: str) -> Path:
        """Move ``incoming/<key>`` into ``work/<key>`` (merging) and return the work folder."""
        with self._lock:
            src = self.root / "incoming" / key
            dst = self.root / "work" / key
            if src.is_dir():
                if not dst.exists():
                    os.replace(src, dst)
                else:
                    for p in src.iterdir():
                        os.replace(p, dst / p.name)
                    src.rmdir()
                fsync_dir(dst.parent)
                fsync_dir(src.parent)
            return dst

    def instances(self, key: str) -> list[Path]:
        return sorted(p for p in (self.root / "work" / key).glob("*.dcm"))

    # -- state ------------------------------------------------------------

    def load_state(self, key: str) -> SeriesState:
        path = self.root / "work" / key / STATE
        try:
            d = json.loads(path.read_text())
            return SeriesState(**d)
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return SeriesState(key=key)

    def save_state(self, state: SeriesState) -> None:
        _write_json(self.root / "work" / state.key / STATE, asdict(state))

    def out_dir(self, key: str) -> Path:
        return self.root / "out" / key

    def dead_letter_dir(self, key: str) -> Path:
        return self.root / "dead-letter" / key

    def drop_resend(self, key: str, names: list[str]) -> None:
        """Instances that repeat part of a finished series: note them in its record, drop them."""
        record = self.done_record(key) or {"key": key}
        ignored = list(record.get("ignored_resends", []))
        ignored.append({"time": time.time(), "instances": len(names)})
        _write_json(self.root / "done" / f"{key}.json", {**record, "ignored_resends": ignored})
        shutil.rmtree(self.root / "work" / key, ignore_errors=True)

    def finish(self, key: str, record: dict[str, Any], *, keep: bool = False) -> None:
        """A series is done: keep a record, drop its delivered results, and its
        instances (or, with ``keep``, move them to ``kept/<key>``)."""
        _write_json(
            self.root / "done" / f"{key}.json", {"key": key, "finished": time.time(), **record}
        )
        work, kept = self.root / "work" / key, self.root / "kept" / key
        if keep and work.is_dir():
            (work / STATE).unlink(missing_ok=True)
            with self._lock:
                shutil.rmtree(kept, ignore_errors=True)  # work holds them all (merged)
                os.replace(work, kept)
                os.utime(kept)  # pruned by age from now
        shutil.rmtree(work, ignore_errors=True)
        out = self.out_dir(key)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()

    def kept_names(self, key: str) -> set[str]:
        """Instance names kept from the finished series ``key`` (empty if none)."""
        return {p.name for p in (self.root / "kept" / key).glob("*.dcm")}

    def merge_kept(self, key: str) -> int:
        """Move the kept instances of ``key`` into ``work/<key>``; return how many moved."""
        kept, work = self.root / "kept" / key, self.root / "work" / key
        moved = 0
        with self._lock:
            for p in sorted(kept.glob("*.dcm")):
                if not (work / p.name).exists():
                    os.replace(p, work / p.name)
                    moved += 1
            shutil.rmtree(kept, ignore_errors=True)
            fsync_dir(work)
        return moved

    def prune_kept(self, max_age_s: float, now: float | None = None) -> None:
        """Delete kept instances of series finished more than ``max_age_s`` ago."""
        now = time.time() if now is None else now
        for folder in (self.root / "kept").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - folder.stat().st_mtime > max_age_s:
                    shutil.rmtree(folder, ignore_errors=True)

    def fail(self, key: str, reason: str, state: SeriesState) -> Path:
        """Give up on a series: move its instances to ``failed/<key>`` with ``reason.json``."""
        dst = self.root / "failed" / key
        with self._lock:
            if dst.exists():
                shutil.rmtree(dst)
            work = self.root / "work" / key
            if work.is_dir():
                os.replace(work, dst)
            else:
                dst.mkdir(parents=True)
        _write_json(
            dst / "reason.json",
            {
                "key": key,
                "reason": reason,
                "attempts": state.attempts,
                "history": state.history,
                "failed": time.time(),
            },
        )
        return dst

    def failed_reason(self, key: str) -> str | None:
        path = self.root / "failed" / key / "reason.json"
        try:
            return str(json.loads(path.read_text())["reason"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def done_record(self, key: str) -> dict[str, Any] | None:
        path = self.root / "done" / f"{key}.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
