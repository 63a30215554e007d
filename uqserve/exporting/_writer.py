"""Write a bundle folder atomically: member files, manifest, checks, a calibration hook.

The bundle is assembled in a temp folder next to the target and renamed onto
it at the end, so a failed export leaves nothing (and an existing bundle
untouched).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from uqserve._fs import replace_dir_atomically
from uqserve.bundle import Bundle, Manifest, Member, load_bundle, sha256_file, write_manifest
from uqserve.exporting._plan import ExportError, ExportPlan

Say = Callable[[str], None]
#: Calibrates a freshly written bundle and returns its new manifest
#: (``uqserve.calibration.calibrate_bundle``). Exporting sits below prediction
#: and calibration, so it never imports them: the caller hands one in.
Calibrator = Callable[[Bundle], Manifest]


@contextmanager
def atomic_bundle_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; rename it to ``target`` on success.

    Refuses an existing ``target`` unless ``overwrite``; on failure nothing is left.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise ExportError(f"{target}: already exists; pass `overwrite=True` to replace it")
    with replace_dir_atomically(target) as tmp:
        yield tmp


def finish_bundle(
    folder: Path,
    plan: ExportPlan,
    files: Sequence[str],
    opset: int,
    *,
    calibrate: Calibrator | None,
    check: Callable[[Bundle], None] | None = None,
    say: Say | None = None,
) -> None:
    """Write the manifest of the member ``files`` in ``folder``, check, calibrate, verify.

    ``check`` runs on the uncalibrated bundle (parity, a smoke run) before
    calibration spends time on it.
    """
    members = tuple(Member(file=f, sha256=sha256_file(folder / f)) for f in files)
    manifest = plan.manifest(members, opset)
    write_manifest(folder, manifest)
    if check is not None:
        check(Bundle(folder, manifest))
    if calibrate:
        if say is not None:
            say("calibrating the default aggregator and OOD threshold on synthetic data")
        write_manifest(folder, calibrate(Bundle(folder, manifest)))
    load_bundle(folder, verify=True)
