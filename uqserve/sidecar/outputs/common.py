"""What every output shares: the options, the coding scheme and units, the map kinds."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd

from uqserve._version import __version__
from uqserve.errors import UsageError

# Private coding scheme for concepts no standard terminology has (DICOM PS3.16 8.2: "99" prefix).
SCHEME = "99UQSERVE"
NAT = hd.sr.CodedConcept("{nat}", "UCUM", "nat")
MILLILITER = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")

MAP_KINDS: dict[str, tuple[str, str]] = {
    "tu": ("Total uncertainty", "entropy of the mean prediction, H[mean p] (nats)"),
    "au": ("Aleatoric uncertainty", "expected entropy of the member predictions (nats)"),
    "eu": ("Epistemic uncertainty", "mutual information between label and member, TU - AU (nats)"),
}
# Series numbers of the outputs: source series number + offset keeps them next to their source.
_SERIES_OFFSET = {"seg": 9000, "tu": 9001, "au": 9002, "eu": 9003, "prob": 9004, "report": 9005}


@dataclass(frozen=True)
class OutputOptions:
    """What to build and how to label it.

    seg_type    ``binary`` (default) or ``labelmap``
    fractional  also write a FRACTIONAL SEG of the foreground probability
    report      also write the Comprehensive SR report
    model_name  shown as algorithm name and Manufacturer's Model Name (the bundle name)
    model_version  algorithm version (uqserve version and bundle checksum)
    """

    seg_type: str = "binary"
    fractional: bool = False
    report: bool = True
    model_name: str = "uqserve"
    model_version: str = __version__
    manufacturer: str = "uqserve"
    device_serial_number: str = "0"

    def __post_init__(self) -> None:
        if self.seg_type not in ("binary", "labelmap"):
            raise UsageError(f"seg_type {self.seg_type!r}: choose 'binary' or 'labelmap'")
