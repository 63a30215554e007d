"""Deterministic UIDs: the same source series and results always get the same UIDs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pydicom.dataset import Dataset


def derived_uid(*parts: object) -> str:
    """A deterministic UID (``2.25.<128-bit integer>``) from ``parts``."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def source_digest(source: Sequence[Dataset]) -> str:
    """A hash of the sorted SOP Instance UIDs of ``source``: which images an output covers."""
    uids = sorted(str(ds.SOPInstanceUID) for ds in source)
    return hashlib.sha256("\x1f".join(uids).encode()).hexdigest()[:32]


def content_digest(source: Sequence[Dataset]) -> str:
    """A hash of everything ``source`` holds: every element of every image (sorted
    by SOP Instance UID), pixel data as its bytes.

    :func:`build_outputs` adds it to the key, so a sender that breaks the DICOM
    rule and re-sends an image under its old UID with new content (a corrected
    patient name, say) gets results under new UIDs, never different results
    under the old ones.
    """
    h = hashlib.sha256()
    for ds in sorted(source, key=lambda d: str(d.SOPInstanceUID)):
        for elem in ds:
            value = elem.value
            h.update(f"{elem.tag}\x1f".encode())
            h.update(value if isinstance(value, bytes) else repr(value).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def _uid(key: str, source: Sequence[Dataset], *parts: object) -> str:
    """An output UID: the key, the source series, the set of its images, the role."""
    series_uid = str(source[0].SeriesInstanceUID)
    return derived_uid(key, series_uid, source_digest(source), *parts)
