"""The PACS sidecar: DICOM in, DICOM SEG, uncertainty maps and a report back.

``Sidecar`` runs a Storage SCP that spools instances durably, groups them by
series, processes a series once it has been stable for a while and sends the
results (built with highdicom) to a PACS by C-STORE.
"""

from uqserve.sidecar.outputs import OutputOptions, build_outputs, write_datasets
from uqserve.sidecar.scp import Limits
from uqserve.sidecar.sender import Peer, SendResult, send_files
from uqserve.sidecar.service import BundlePredictor, PermanentError, Sidecar, SidecarConfig
from uqserve.sidecar.spool import Spool, series_key

__all__ = [
    "BundlePredictor",
    "Limits",
    "OutputOptions",
    "Peer",
    "PermanentError",
    "SendResult",
    "Sidecar",
    "SidecarConfig",
    "Spool",
    "build_outputs",
    "send_files",
    "series_key",
    "write_datasets",
]
