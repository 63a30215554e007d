"""Volumes: reading NIfTI and DICOM series, writing outputs atomically."""

from uqserve.volumes.base import Volume

__all__ = ["Volume"]
