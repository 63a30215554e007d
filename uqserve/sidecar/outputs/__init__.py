"""DICOM results for a PACS, built with highdicom from one prediction.

For a source series (single-frame CT/MR images, sorted as the volume's last
axis) this module writes, each in its own series of the source study:

* a **DICOM SEG** of the segmentation (``BINARY``, the widely supported form,
  one segment per foreground class; or ``LABELMAP``, newer and smaller, which
  older PACS and validators do not know yet);
* three **Parametric Maps** (float32) for total, aleatoric and epistemic
  uncertainty, with a Real World Value Mapping whose unit is nats
  (UCUM ``{nat}``) and a window from 0 to ln K;
* optionally a **FRACTIONAL SEG** of the foreground probability (viewer
  support is uneven, hence off by default);
* a **Comprehensive SR** with the report facts (OOD flag, score and threshold,
  per-class volume with its 95 % interval, AU/EU entanglement) as coded and
  numeric items plus one plain-language summary line. SR rather than an
  Encapsulated PDF: it needs no PDF renderer, every PACS stores it, viewers
  (OHIF, Weasis, Orthanc's Stone viewer, dcmtk's ``dsr2html``) show it as
  text, and the numbers stay machine-readable with units.

Every UID of an output is derived from a key (the bundle checksum and seed),
the source series UID and the set of source SOP Instance UIDs
(:func:`build_outputs` adds the images' content too), and every
date and time in it from the source series (:func:`make_deterministic`): the
same series processed twice — after a crash, say — gives byte-identical
objects, and a different set of instances (part of a series re-sent) gives
different UIDs, so a PACS never holds two different objects under one UID.

Patient and study attributes highdicom copies and refuses when invalid (a
PatientSex of ``U``, an impossible date) are blanked in a copy of the source
(:func:`sanitize_sources`) and named in the SR instead of failing the series.

Array conventions: ``[X=columns, Y=rows, Z=slices]`` as in
:class:`uqserve.volumes.Volume`; ``prob`` is ``[K, X, Y, Z]``.

Modules: ``common`` (options, codes, units), ``uids`` (deterministic UIDs),
``attributes`` (what is taken from the source, made deterministic),
``images`` (SEG and parametric maps), ``sr`` (the structured report),
``assemble`` (``build_outputs``, ``write_datasets``).
"""

from __future__ import annotations

from uqserve.sidecar._source_frames import SourceFrames
from uqserve.sidecar.outputs.assemble import build_outputs, write_datasets
from uqserve.sidecar.outputs.attributes import make_deterministic, sanitize_sources
from uqserve.sidecar.outputs.common import MAP_KINDS, OutputOptions
from uqserve.sidecar.outputs.images import (
    make_fractional_segmentation,
    make_parametric_map,
    make_segmentation,
)
from uqserve.sidecar.outputs.sr import make_report
from uqserve.sidecar.outputs.uids import content_digest, derived_uid, source_digest

__all__ = [
    "MAP_KINDS",
    "OutputOptions",
    "SourceFrames",
    "build_outputs",
    "content_digest",
    "derived_uid",
    "make_deterministic",
    "make_fractional_segmentation",
    "make_parametric_map",
    "make_report",
    "make_segmentation",
    "sanitize_sources",
    "source_digest",
    "write_datasets",
]
