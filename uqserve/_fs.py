"""Filesystem primitives shared by every writer: nothing half-written, nothing lost."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replace_dir_atomically(final: str | os.PathLike[str], mode: int = 0o755) -> Iterator[Path]:
    """Yield a temp folder beside ``final`` that takes ``final``'s place on success.

    An existing ``final`` is swapped out only once the new folder is complete; on
    any error the temp folder is removed and ``final`` is left as it was. Callers
    decide beforehand whether replacing ``final`` is allowed. ``mode`` opens up
    the folder that ``mkdtemp`` creates private (0700), less the umask.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
