"""The one atomic writer: files and folders appear whole or not at all.

Every uqserve writer goes through here. Files and folders get the modes any
other program's would: ``0666`` / ``0777`` less the process umask (``mkstemp``
and ``mkdtemp`` create them private, which broke a server running as another
user). ``fsync=True`` makes the result durable before the call returns (the
sidecar acknowledges a C-STORE only then).

Files: :func:`atomic_path` yields a temporary path beside the target for
writers that want a file name (nibabel); :func:`atomic_file` an open file;
:func:`atomic_write_bytes` / :func:`atomic_write_text` write a whole value.
:func:`write_temp_file` and :func:`commit_file` are the two halves, for a
writer that must rename under its own lock (the sidecar's spool).

Folders: :func:`replace_dir_atomically`. A result folder ``final`` is built
under ``.NAME.tmp-<host>.<pid>.<start>-XXXX`` beside it and moved into place by
one rename at the end:

- the commit holds an exclusive ``flock`` on the parent folder, so two writers
  of the same ``final`` never interleave their check and rename;
- without ``overwrite`` the rename is *no-replace* (``renameat2`` with
  ``RENAME_NOREPLACE``): a ``final`` that appeared meanwhile is never replaced;
- with ``overwrite`` the new folder and the old one are *exchanged* in one step
  (``RENAME_EXCHANGE``), so ``final`` is never missing nor a mix; the last
  writer wins. Where ``renameat2`` is missing, the lock makes the two-rename
  fallback safe against other uqserve writers;
- a temp folder left by a killed writer names its owner (machine and pid
  namespace, pid, start time): the next writer in the same folder removes
  those whose owner is gone (judged by age for owners it cannot see).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from uqserve import _failpoints

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_STALE = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.(?P<start>\d+)-[^/]+$"
)
# A temp folder of a writer on another machine or in another pid namespace (a shared
# volume) cannot be judged by its pid: it is stale only when untouched this long.
FOREIGN_STALE_S = 2 * 24 * 3600.0


# Temp and old folders carry the final name plus ~45 bytes of owner tag; a longer name
# is cut (at a character) and tagged with its hash so the whole stays under NAME_MAX (255).
_MAX_STEM_BYTES = 150
_CUT_STEM = re.compile(r"~[0-9a-f]{12}$")


def _stem(name: str) -> str:
    """``name``, or for a long one its first ~130 bytes, ``~`` and 12 hex of its hash."""
    raw = os.fsencode(name)
    if len(raw) <= _MAX_STEM_BYTES:
        return name
    head = raw[: _MAX_STEM_BYTES - 20].decode("utf-8", "ignore")  # never half a character
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:12]}"


def current_umask() -> int:
    """The process umask (read without a lasting change)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of folder ``path`` (names added, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(target: Path, folder: Path | None) -> Path:
    """An empty temp file for ``target`` in ``folder`` (default: beside it), mode per umask.

    It keeps the target's suffixes (``.nii.gz``) for writers that pick the format by name.
    """
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".part{suffix}", dir=folder or target.parent
    )
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; outputs follow the umask
    finally:
        os.close(fd)
    return Path(tmp)


def write_temp_file(folder: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to a new temp file in ``folder``; :func:`commit_file` puts it in place."""
    tmp = _temp_beside(Path(folder) / "data", Path(folder))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit_file(
    tmp: str | os.PathLike[str], target: str | os.PathLike[str], *, fsync: bool = False
) -> Path:
    """Rename the temp file ``tmp`` onto ``target`` (same filesystem); on error remove ``tmp``."""
    target = Path(target)
    try:
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(target.parent)
    return target


@contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    *,
    fsync: bool = False,
    temp_dir: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Yield a temp file name; what is written there replaces ``path`` on success.

    On any error the temp file is removed and ``path`` is left as it was.
    ``temp_dir``: where the temp file lives (same filesystem as ``path``).
    """
    target = Path(path)
    tmp = _temp_beside(target, None if temp_dir is None else Path(temp_dir))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # a writer that replaced the file made a new one
        if fsync:
            _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_file(tmp, target, fsync=fsync)


@contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "wb", *, fsync: bool = False
) -> Iterator[IO[Any]]:
    """Open a temp file (``mode`` ``"wb"`` or ``"w"``) that replaces ``path`` on success."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, mode) as f:
        yield f  # closed before atomic_path fsyncs and renames it


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    The file gets the mode every other output gets (0666 less the umask).
    """
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), ``None`` when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start: int) -> bool:
    """True when process ``pid`` runs and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return now is None or start == 0 or now == start  # pid reused: a different start time


def _host_tag() -> str:
    """8 hex digits naming this boot and pid namespace: where a pid means something."""
    parts = []
    for probe in (
        lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        lambda: str(os.stat("/proc/self/ns/pid").st_ino),
    ):
        try:
            parts.append(probe())
        except OSError:
            parts.append("?")
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:8]


def owner_tag() -> str:
    """``<host>.<pid>.<start time>``: names this process in its temp folders."""
    return f"{_host_tag()}.{os.getpid()}.{_start_time(os.getpid()) or 0}"


def remove_stale(folder: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` folders in ``folder`` whose writer died.

    A SIGKILL or a power loss leaves them. The owner is judged by pid and start
    time when it ran on this machine and pid namespace, else by age
    (``FOREIGN_STALE_S``). A dead writer's ``.old-`` folder whose ``NAME`` is
    missing (killed between the two renames of the fallback swap) is put back
    as ``NAME``. Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for entry in entries:
        m = _STALE.match(entry.name)
        if m is None or entry.is_symlink() or not entry.is_dir():
            continue
        if m["host"] == host:
            if _alive(int(m["pid"]), int(m["start"])):
                continue
        else:
            try:
                if now - entry.stat().st_mtime < FOREIGN_STALE_S:
                    continue
            except OSError:
                continue
        if m["kind"] == "old" and not _final_exists(folder, m["name"], entries):
            if _CUT_STEM.search(m["name"]):
                continue  # a cut name cannot be put back: left in place, never removed
            os.rename(entry, folder / m["name"])  # the old results come back
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def make_owned_temp_dir(prefix: str) -> Path:
    """A new folder ``<prefix><host>.<pid>.<start>-XXXX`` in the system temp folder.

    Its name says which process owns it, so :func:`remove_dead_owners_temp`
    can remove it after that process died without cleaning up (SIGKILL).
    """
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-"))


def remove_dead_owners_temp(
    prefix: str, root: Path | None = None, *, log_name: str | None = None
) -> list[Path]:
    """Remove the :func:`make_owned_temp_dir` folders under ``root`` whose owner died.

    ``root`` defaults to the system temp folder. Only owners on this machine and pid
    namespace are judged. A folder holding nothing but ``log_name`` (a failed start's
    log, shown to the user) is kept for ``FOREIGN_STALE_S``. Returns what was removed.
    """
    root = Path(root or tempfile.gettempdir())
    owner = r"(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.(?P<start>\d+)-"
    pattern = re.compile(re.escape(prefix) + owner)
    host, removed = _host_tag(), list[Path]()
    try:
        entries = sorted(root.glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or m["host"] != host or entry.is_symlink() or not entry.is_dir():
            continue
        if _alive(int(m["pid"]), int(m["start"])) or _young_log_only(entry, log_name):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _young_log_only(folder: Path, log_name: str | None) -> bool:
    """``folder`` holds only ``log_name``, written less than ``FOREIGN_STALE_S`` ago."""
    try:
        names = [p.name for p in folder.iterdir()]
        young = time.time() - folder.stat().st_mtime < FOREIGN_STALE_S
    except OSError:
        return False
    return log_name is not None and names == [log_name] and young


def _final_exists(folder: Path, stem: str, entries: list[Path]) -> bool:
    """Whether the folder whose temp stem is ``stem`` exists in ``folder``."""
    if not _CUT_STEM.search(stem):
        return os.path.lexists(folder / stem)
    return any(_stem(e.name) == stem and not _STALE.match(e.name) for e in entries)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the kernel or filesystem lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``folder`` itself (no lock file left behind)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _commit(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``final``; see the module docstring for the guarantees."""
    with _locked(final.parent):
        _failpoints.reached("commit")
        if not os.path.lexists(final):
            if not _renameat2(tmp, final, _RENAME_NOREPLACE):
                os.rename(tmp, final)  # fallback: the lock keeps uqserve writers apart
            return
        if not overwrite:
            raise FileExistsError(errno.EEXIST, "exists already (written meanwhile)", str(final))
        if _renameat2(tmp, final, _RENAME_EXCHANGE):
            _remove(tmp)  # tmp now holds the old folder (or the old symlink)
            return
        old = final.parent / f".{_stem(final.name)}.old-{owner_tag()}-{os.urandom(4).hex()}"
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)  # put the old results back
            raise
        _remove(old)


def _remove(path: Path) -> None:
    """Remove a folder tree, or a symlink or file (never what a symlink points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def replace_dir_atomically(
    final: str | os.PathLike[str],
    mode: int = 0o777,
    *,
    overwrite: bool = True,
    fsync: bool = False,
) -> Iterator[Path]:
    """Yield a temp folder beside ``final`` that takes ``final``'s place on success.

    On any error (or signal) the temp folder is removed and ``final`` is left as
    it was. ``overwrite=False``: raises ``FileExistsError`` at the end when
    ``final`` exists by then (another writer got there first); ``True``: the
    existing ``final`` is exchanged for the new folder in one step. ``mode``
    opens up the folder that ``mkdtemp`` creates private (0700), less the umask.
    ``fsync``: every file and folder written is durable before the rename, and
    the rename before the return. Stale temp folders of dead writers of
    ``final`` are removed first.
    """
    final = Path(final)
    created = _make_parents(final.parent)
    try:
        remove_stale(final.parent)
        prefix = f".{_stem(final.name)}.tmp-{owner_tag()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        try:
            yield tmp
            os.chmod(tmp, mode & ~current_umask())
            if fsync:
                _fsync_tree(tmp)
            _failpoints.reached("written")
            _commit(tmp, final, overwrite)
            if fsync:
                fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        for folder in created:  # innermost first; a folder that is not empty stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, innermost first."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_file(os.path.join(root, name))
        fsync_dir(root)


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, innermost first."""
    missing: list[Path] = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def read_json_object(
    path: str | os.PathLike[str], error: Callable[[str], Exception], fix: str
) -> dict[str, Any]:
    """A JSON file holding one object; each failure is ``error`` naming ``path`` and ``fix``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise error(f"{path}: cannot read ({reason}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must hold a JSON object; {fix}")
    return data
