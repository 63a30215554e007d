"""Real DICOM peers for tests: synthetic series, Orthanc, dcmtk, dicom3tools.

* :func:`write_ct_series` writes a synthetic CT series with pydicom (single-frame
  CT Image Storage, int16 + Rescale Slope/Intercept), geometry of your choice,
  and patient identifiers that tests then look for in logs.
* :class:`Orthanc` starts the real ``Orthanc`` binary on free loopback ports
  with a temp config and talks to its REST API.
* :func:`storescu`, :func:`echoscu` run dcmtk's tools; :func:`dciodvfy` runs
  the dicom3tools IOD validator and returns its error lines.

Tests that need a binary call :func:`require` which skips with the reason.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Identifiers planted in every synthetic series; logs must never contain them.
PATIENT_NAME = "Doe^Janet^Q"
PATIENT_ID = "PID-7731-SECRET"
PATIENT_BIRTH_DATE = "19610423"


def require(*binaries: str) -> None:
    """Skip the calling test unless every binary is on PATH."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed (apt-get install orthanc dcmtk dicom3tools)",
            allow_module_level=False,
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


# --------------------------------------------------------------------------- synthetic data


def phantom(shape: tuple[int, int, int] = (64, 64, 8), seed: int = 0) -> np.ndarray:
    """A CT-like phantom ``[X, Y, Z]`` in HU: air, a soft-tissue body, a bright lesion.

    Uses ``uqserve.data.make_volume`` when the data package provides it.
    """
    try:
        from uqserve.data import make_volume  # type: ignore[attr-defined]

        vol = make_volume(seed, shape=shape)
        img = np.asarray(vol.volume.data, dtype=np.float32)
        lo, hi = float(img.min()), float(img.max())
        return (img - lo) / max(hi - lo, 1e-6) * 1100.0 - 1000.0
    except (ImportError, AttributeError, TypeError):
        pass
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[(x / 0.8) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    img[(x - 0.2) ** 2 + (y + 0.1) ** 2 + (z / 2.5) ** 2 < 0.1] = 300.0
    img += rng.normal(0, 10, size=shape).astype(np.float32)
    return img


@dataclass
class SyntheticSeries:
    files: list[Path]
    hu: np.ndarray  # [X, Y, Z] the values written (after rounding), in slice order
    affine_lps: np.ndarray  # voxel (i=col, j=row, k) -> LPS mm
    study_uid: str
    series_uid: str


def write_ct_series(
    folder: str | Path,
    hu: np.ndarray | None = None,
    *,
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-25.0, -20.0, 100.0),
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    shuffle_names: bool = True,
    seed: int = 0,
) -> SyntheticSeries:
    """Write ``hu [X=cols, Y=rows, Z]`` as a single-frame CT series in ``folder``.

    ``spacing`` is (column spacing, row spacing, slice spacing) in mm; the slice
    direction is row x column direction. File names are random when
    ``shuffle_names`` so readers cannot rely on them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hu is None:
        hu = phantom(seed=seed)
    hu = np.round(np.asarray(hu, dtype=np.float64))
    cols, rows, nz = hu.shape
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    aff = np.eye(4)
    aff[:3, 0] = row_dir * spacing[0]
    aff[:3, 1] = col_dir * spacing[1]
    aff[:3, 2] = normal * spacing[2]
    aff[:3, 3] = origin
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    rng = np.random.default_rng(seed + 1)
    files = []
    for k in range(nz):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = PATIENT_BIRTH_DATE
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC-SECRET-9"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101010"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.Modality = modality
        ds.Manufacturer = "uqserve tests"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [float(v) for v in (aff @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing, column spacing
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        stored = (hu[:, :, k].T + 1024).astype(np.int16)  # [rows, cols]
        ds.PixelData = stored.tobytes()
        name = f"{rng.integers(1 << 40):x}.dcm" if shuffle_names else f"slice{k:03d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return SyntheticSeries(
        files=files,
        hu=hu.astype(np.float32),
        affine_lps=aff,
        study_uid=study_uid,
        series_uid=series_uid,
    )


def set_raw_value(path: str | Path, keyword: str, raw: bytes) -> None:
    """Store ``raw`` as the bytes of ``keyword`` in the file at ``path``, unchecked.

    pydicom refuses to build malformed values (``ABC`` as a DS); a raw element is
    written as is, as a broken modality would write it.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(path)
    tag = Tag(tag_for_keyword(keyword))
    raw = raw + b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    ds.save_as(path)


# --------------------------------------------------------------------------- dcmtk / dicom3tools


def storescu(
    files: Sequence[str | Path],
    port: int,
    *,
    called_ae: str,
    calling_ae: str = "STORESCU",
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk's ``storescu`` (one association); returns the finished process."""
    require("storescu")
    # -R: propose exactly the SOP classes of the files (the default list lacks e.g. SEG).
    cmd = [
        "storescu",
        "-R",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "--no-halt",
        host,
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def sent(proc: subprocess.CompletedProcess[str]) -> bool:
    """Whether storescu stored every file (it exits 0 on some per-file failures)."""
    return proc.returncode == 0 and not any(
        line.startswith("E:") for line in (proc.stdout + proc.stderr).splitlines()
    )


def echoscu(
    port: int, *, called_ae: str, calling_ae: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    require("echoscu")
    cmd = ["echoscu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def dciodvfy(path: str | Path) -> tuple[list[str], str]:
    """Validate one file with dicom3tools' ``dciodvfy``; return (error lines, full output)."""
    require("dciodvfy")
    proc = subprocess.run(
        ["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    return errors, out


# --------------------------------------------------------------------------- Orthanc


class Orthanc:
    """A real Orthanc on loopback ports, configured in a temp folder.

    ``modalities`` maps a name to ``(AE title, host, port)`` of peers Orthanc may
    talk to (e.g. the sidecar). Use as a context manager.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        lua: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        require("Orthanc")
        self.workdir = Path(workdir)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities or {}
        self.lua = lua
        self.config = config or {}  # more Orthanc settings (plugins, TLS, users)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "uqserve-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [],
            "StableAge": 1,
            **self.config,
        }
        if self.lua is not None:
            (self.workdir / "route.lua").write_text(self.lua)
            cfg["LuaScripts"] = [str(self.workdir / "route.lua")]
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        log = open(self.workdir / "orthanc.log", "wb")
        self._log = log
        self.proc = subprocess.Popen(
            ["Orthanc", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.get("/system")
                wait_port(self.dicom_port, timeout=5)
                return self
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError("Orthanc did not start within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def instances_by_modality(self) -> dict[str, list[dict[str, Any]]]:
        """Every stored instance's simplified tags, grouped by Modality."""
        out: dict[str, list[dict[str, Any]]] = {}
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            tags["_id"] = iid
            out.setdefault(str(tags.get("Modality", "")), []).append(tags)
        return out

    def wait_for(self, predicate: Any, timeout: float = 60.0, interval: float = 0.3) -> Any:
        """Poll ``predicate(self)`` until it returns something truthy; return it."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate(self)
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"condition not met within {timeout} s (last: {last!r})")


@contextlib.contextmanager
def running(
    cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in the background with output to ``log_path``; kill it on exit."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def read(path: str | Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)
