"""Volumes: reading NIfTI and DICOM series, writing outputs atomically."""

from uqserve._fs import atomic_write_bytes
from uqserve.volumes.base import Volume, VolumeError
from uqserve.volumes.io import (
    OutputError,
    atomic_output_dir,
    read_volume,
    sanitize,
)
from uqserve.volumes.nifti import read_nifti, scan_name, write_nifti_like, write_niftis_like

__all__ = [
    "OutputError",
    "Volume",
    "VolumeError",
    "atomic_output_dir",
    "atomic_write_bytes",
    "read_nifti",
    "read_volume",
    "sanitize",
    "scan_name",
    "write_nifti_like",
    "write_niftis_like",
]
