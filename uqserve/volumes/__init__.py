"""Volumes: reading NIfTI and DICOM series, writing outputs atomically."""

from uqserve.volumes.base import Volume, VolumeError

__all__ = ["Volume", "VolumeError"]
