"""The PACS sidecar: DICOM in, DICOM SEG, uncertainty maps and a report back.

``Sidecar`` runs a Storage SCP that spools instances durably, groups them by
series, processes a series once it has been stable for a while and sends the
results (built with highdicom) to a PACS by C-STORE (optionally over DICOM
TLS, :class:`TLSConfig`) or to a DICOMweb archive by STOW-RS
(:class:`WebPeer`, :func:`stow_files`), with health and Prometheus metrics
(:class:`SidecarMetrics`).
"""

from uqserve.sidecar.dicomweb import WebAuth, WebPeer, stow_files
from uqserve.sidecar.metrics import SidecarMetrics
from uqserve.sidecar.outputs import OutputOptions, SourceFrames, build_outputs, write_datasets
from uqserve.sidecar.scp import Limits
from uqserve.sidecar.sender import Peer, SendResult, send_files
from uqserve.sidecar.service import BundlePredictor, PermanentError, Sidecar, SidecarConfig
from uqserve.sidecar.spool import Spool, series_key
from uqserve.sidecar.tls import TLSConfig

__all__ = [
    "BundlePredictor",
    "Limits",
    "OutputOptions",
    "Peer",
    "PermanentError",
    "SendResult",
    "Sidecar",
    "SidecarConfig",
    "SidecarMetrics",
    "SourceFrames",
    "Spool",
    "TLSConfig",
    "WebAuth",
    "WebPeer",
    "build_outputs",
    "send_files",
    "series_key",
    "stow_files",
    "write_datasets",
]
