"""NIfTI-1 / NIfTI-2 reading and header-preserving writing (nibabel).

Reading applies ``scl_slope`` / ``scl_inter`` to any stored dtype and byte
order and returns float32. 2D images become ``[X, Y, 1]``; a 4D series needs
``volume_index`` to pick one volume. Writing copies the reference header so
that outputs keep the input affine, qform/sform codes, units and orientation.

``.nii.gz`` outputs are gzip streams (one member, no file name, mtime 0, so
equal maps give equal bytes) written by ISA-L's igzip (``isal``) at levels
1-3 and by zlib otherwise. igzip compresses a file's 1 MiB blocks in
``threads`` threads (``isal.igzip_threaded``, each block primed with the
previous 32 KiB, so the bytes do not depend on the thread count). At level 1
igzip compressed float32 uncertainty maps about 10x faster than zlib's level
1 (nibabel's default) into files no larger (benchmarks/bench_gzip.py); any
gzip reader opens them. Gzipped inputs are inflated by igzip too (about
twice as fast as zlib).
:func:`write_niftis_like` writes several maps in parallel threads (both
compressors release the GIL).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.volumes.base import (
    Volume,
    VolumeError,
    check_voxel_count,
    geometry_warnings,
    intensity_warnings,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# An axis counts as through-plane when its spacing exceeds the others by this factor.
_ANISOTROPY = 1.2
#: gzip level of ``.nii.gz`` outputs: 0 (stored) .. 9 (smallest, slowest).
DEFAULT_COMPRESSION_LEVEL = 1


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def scan_name(path: str | os.PathLike[str]) -> str:
    """``/a/b/scan.nii.gz`` -> ``scan``; folders keep their name (``.``: the real one)."""
    name = Path(path).name
    if name in ("", ".", ".."):
        name = Path(path).resolve().name or "root"
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_nifti(
    path: str | os.PathLike[str],
    volume_index: int | None = None,
    *,
    max_voxels: int | None = None,
) -> Volume:
    """Read a NIfTI-1/2 file (``.nii`` or ``.nii.gz``) into a float32 ``Volume``.

    Returns ``data [X, Y, Z]`` (2D files: ``[X, Y, 1]``) with the scaling applied,
    the nibabel best affine (sform if its code is set, else qform) and a copy of
    the header for writing outputs. ``slice_axis`` is the last axis unless
    another axis has clearly the largest spacing (> 1.2x every other axis).
    4D files with more than one volume need ``volume_index`` (0-based).
    Raises ``VolumeError`` naming the file and the fix: complex data, more than
    ``max_voxels`` voxels (checked before reading), impossible voxel sizes.
    Odd but usable headers (zero pixdim read as 1 mm, unusual voxel sizes,
    huge intensities) are listed in ``meta["warnings"]``.
    """
    p = Path(path)
    img = _open_nifti(p)
    header = img.header
    stored_shape = tuple(int(s) for s in img.shape)
    shape = _checked_shape(p, header, stored_shape, volume_index)
    ndim = len(shape)
    check_voxel_count(str(p), shape[:3], max_voxels)
    _check_file_holds_voxels(p, header, stored_shape)
    _check_qform(p, header)
    scaling = _scaling_warnings(p, header)
    data = _read_voxels(p, img, shape, volume_index)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) == 0:
        raise VolumeError(
            f"{p}: the header's affine is singular or not finite; fix the qform/sform"
        )
    warnings = _zero_pixdim_warnings(p, header, ndim) + geometry_warnings(str(p), affine)
    warnings += scaling + intensity_warnings(data)
    qcode = int(header["qform_code"])
    scode = int(header["sform_code"])
    meta: dict[str, Any] = {
        "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
        "stored_shape": stored_shape,
        "stored_dtype": str(header.get_data_dtype()),
        "qform_code": qcode,
        "sform_code": scode,
        "ndim": 2 if ndim == 2 else 3,  # 2D inputs get 2D outputs
        "volume_index": volume_index if ndim == 4 else None,
        "warnings": warnings,
    }
    vol = Volume(data=data, affine=affine, source=p.name, header=header.copy(), meta=meta)
    vol.slice_axis = through_plane_axis(vol.spacing, data.shape)
    return vol


def _open_nifti(p: Path) -> nib.Nifti1Image:
    """The NIfTI-1/2 image at ``p`` (header read, voxels not yet), or a ``VolumeError``."""
    if not p.exists():
        raise VolumeError(f"{p}: no such file")
    if not p.is_file():
        raise VolumeError(f"{p}: not a file; pass a .nii/.nii.gz file or a DICOM folder")
    try:
        # nibabel prints header fixes (zero pixdim -> 1) on stderr; we report them instead.
        img = _load_quietly(p)
    except Exception as exc:  # nibabel raises many types for foreign/corrupt files
        raise VolumeError(f"{p}: not a readable NIfTI file ({_reason(exc)})") from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise VolumeError(
            f"{p}: {type(img).__name__} is not NIfTI; convert it to .nii.gz (e.g. with dcm2niix)"
        )
    return img


def _checked_shape(
    p: Path, header: Any, stored_shape: tuple[int, ...], volume_index: int | None
) -> tuple[int, ...]:
    """The stored shape without trailing 1s, checked: real grey-scale 2D/3D, or 4D with an index."""
    if any(s == 0 for s in stored_shape) or len(stored_shape) == 0:
        raise VolumeError(f"{p}: empty image (shape {stored_shape}); nothing to predict")
    if np.dtype(header.get_data_dtype()).kind == "V":
        raise VolumeError(
            f"{p}: colour (RGB) voxel data; predict reads grey-scale intensities: "
            "convert it to one channel first"
        )
    if np.dtype(header.get_data_dtype()).kind == "c":
        raise VolumeError(
            f"{p}: complex voxel data ({header.get_data_dtype()}); predict reads real "
            "intensities: save the magnitude image (abs) instead"
        )
    shape = _squeeze_trailing(stored_shape)
    ndim = len(shape)
    if ndim < 2 or ndim > 4:
        raise VolumeError(
            f"{p}: {ndim}D data (shape {stored_shape}); need a 2D slice or a 3D volume"
        )
    if ndim == 4:
        n = shape[3]
        if volume_index is None:
            raise VolumeError(
                f"{p}: 4D series with {n} volumes (shape {stored_shape}); "
                f"pick one with `volume_index` 0..{n - 1}"
            )
        if not 0 <= volume_index < n:
            raise VolumeError(f"{p}: `volume_index={volume_index}` out of range 0..{n - 1}")
    elif volume_index not in (None, 0):
        raise VolumeError(
            f"{p}: `volume_index={volume_index}` given but the image is {ndim}D "
            "(one volume, index 0)"
        )
    return shape


# deflate never packs more than 1032 bytes into one: a bound on what a .gz can hold.
_DEFLATE_MAX_RATIO = 1032


def _check_file_holds_voxels(p: Path, header: Any, stored_shape: tuple[int, ...]) -> None:
    """Refuse a header that claims more voxel bytes than the file can hold, before allocating.

    ``.nii``: the file must reach ``vox_offset`` + the voxel bytes; ``.nii.gz``: the
    voxel bytes must not exceed what deflate can pack into the compressed size.
    """
    itemsize = np.dtype(header.get_data_dtype()).itemsize
    need = int(np.prod(stored_shape, dtype=object)) * itemsize
    size = p.stat().st_size
    gz = p.name.lower().endswith(".gz")
    room = size * _DEFLATE_MAX_RATIO if gz else size - int(header["vox_offset"])
    if need > room:
        dims = "x".join(str(s) for s in stored_shape)
        held = f"{size:,} bytes{' compressed' if gz else ''}"
        raise VolumeError(
            f"{p}: the header claims {dims} voxels ({need:,} bytes) but the file holds "
            f"{held}; the file is truncated or its header is wrong"
        )


def _scaling_warnings(p: Path, header: Any) -> list[str]:
    """Refuse an infinite ``scl_slope``; warn when an unset slope drops a real ``scl_inter``.

    NIfTI's "no scaling" is ``scl_slope`` 0, nibabel writes NaN; either way the
    intercept is then ignored, which must not pass unnoticed.
    """
    # nibabel resets the loaded image's scl_* fields: read them as the file stores them.
    with nib.openers.ImageOpener(str(p)) as f:
        stored = type(header).from_fileobj(f, check=False)
    slope, inter = float(stored["scl_slope"]), float(stored["scl_inter"])
    if np.isinf(slope):
        raise VolumeError(
            f"{p}: the header's scl_slope is infinite; fix it "
            "(scl_slope 0 or 1 and scl_inter 0 mean no scaling)"
        )
    if (np.isnan(slope) or slope == 0) and np.isfinite(inter) and inter != 0:
        return [
            f"scl_slope is {slope:g} (no scaling), so scl_inter {inter:g} is ignored: "
            "check the header if the intensities look shifted"
        ]
    return []


def _check_qform(p: Path, header: Any) -> None:
    """A qform that is a rotation when its code is set, checked at read.

    The outputs copy it: a corrupt quaternion beside a valid sform would otherwise
    fail only when the results are written.
    """
    if int(header["qform_code"]) <= 0:
        return
    try:
        qform = header.get_qform()
    except Exception:  # nibabel: a quaternion with b^2 + c^2 + d^2 > 1
        qform = None
    if qform is None or not np.all(np.isfinite(qform)):
        raise VolumeError(
            f"{p}: the header's qform (quatern_b/c/d, qoffset) is not a valid rotation "
            f"but qform_code is {int(header['qform_code'])}; fix the qform or set "
            "qform_code to 0"
        )


def _to_float32(p: Path, arr: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """``arr`` as float32; values beyond float32's range (a float64 1e300) are refused."""
    try:
        with np.errstate(over="raise"):
            return np.asarray(arr, dtype=np.float32)
    except FloatingPointError:
        finite = np.isfinite(arr)
        peak = float(np.max(np.abs(arr), where=finite, initial=0.0))
        raise VolumeError(
            f"{p}: voxel values up to {peak:.3g} in magnitude do not fit in float32 "
            f"(at most {float(np.finfo(np.float32).max):.3g}); the data type or scale factor "
            "(scl_slope) is wrong: fix the file"
        ) from None


def _read_voxels(
    p: Path, img: nib.Nifti1Image, shape: tuple[int, ...], volume_index: int | None
) -> npt.NDArray[np.float32]:
    """The scaled voxels ``[X, Y, Z]`` float32 (2D: ``[X, Y, 1]``; 4D: volume ``volume_index``)."""
    try:
        with _voxel_source(p, img) as source:
            proxy = source.dataobj
            if len(shape) == 4:
                arr = np.asanyarray(proxy[..., volume_index])
                arr = arr.reshape(shape[:3])
            else:
                arr = np.asanyarray(proxy).reshape(shape)
    except Exception as exc:  # truncated gzip (EOFError, zlib.error), short files (ValueError)
        raise VolumeError(
            f"{p}: cannot read the voxel data ({_reason(exc)}); the file is truncated or corrupt"
        ) from exc
    # dataobj applies scl_slope/inter; float32 is enough precision for any stored type.
    data = _to_float32(p, arr)
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    return data


@contextlib.contextmanager
def _voxel_source(p: Path, img: nib.Nifti1Image) -> Iterator[nib.Nifti1Image]:
    """``img``; for a gzipped file, the same image read through ISA-L's igzip.

    nibabel inflates with zlib: a 512 x 512 x 64 float32 scan took 0.56 s to read,
    0.28 s through igzip (same voxels, same nibabel scaling code).
    """
    if not p.name.lower().endswith(".gz"):
        yield img
        return
    try:
        from isal import igzip
    except ImportError:  # isal has no wheel for this platform: nibabel's zlib reader
        yield img
        return
    with igzip.open(p, "rb") as stream:
        holder = nib.FileHolder(filename=str(p), fileobj=stream)
        with _quiet_nibabel():  # the header is read again
            image = type(img).from_file_map({"header": holder, "image": holder})
        yield image


def through_plane_axis(spacing: tuple[float, ...], shape: tuple[int, ...]) -> int:
    """The axis predict slices along: an axis of one voxel (a single slice, however
    stored: ``[X, Y, 1]`` and ``[1, X, Y]`` alike), else the last one, unless another
    axis has the clearly largest spacing (> 1.2x each other axis) and more than one voxel."""
    single = [ax for ax in (2, 0, 1) if shape[ax] == 1]
    if single:
        return single[0]
    order = np.argsort(spacing)[::-1]
    top = int(order[0])
    if (
        top != 2
        and shape[top] > 1
        and all(spacing[top] > _ANISOTROPY * spacing[i] for i in range(3) if i != top)
    ):
        return top
    return 2


def write_nifti_like(
    array: npt.NDArray[Any],
    reference: Volume,
    path: str | os.PathLike[str],
    *,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    threads: int = 1,
) -> Path:
    """Write ``array`` with the geometry of ``reference``.

    ``array`` is ``[X, Y, Z]`` (= ``reference.shape``) or ``[X, Y, Z, N]`` (one
    volume per N, e.g. per-class probabilities). The output keeps the input's
    affine, qform/sform and their codes, units and NIfTI version; scaling is
    reset so values are stored as given in ``array``'s dtype. For references
    without a NIfTI header (DICOM series) both codes are 1 (scanner anatomical).
    ``compression_level`` (0-9, gzip's scale) applies to ``.nii.gz`` paths;
    ``threads`` compress one file's blocks at levels 1-3 (same bytes). Writes
    to ``path`` directly; use it inside ``atomic_output_dir``.
    """
    check_compression_level(compression_level)
    # NIfTI stores voxels in Fortran order: nibabel reorders a C-ordered array in small
    # chunks, 3-7x slower than writing a Fortran-ordered one (a no-op for those).
    arr = np.asfortranarray(array)
    if tuple(arr.shape[:3]) != reference.shape or arr.ndim not in (3, 4):
        raise UsageError(
            f"array shape {arr.shape} does not match the reference volume {reference.shape} "
            "(expected [X, Y, Z] or [X, Y, Z, N])"
        )
    hdr = reference.header
    if reference.meta.get("ndim") == 2 and arr.ndim == 3:
        arr = arr[:, :, 0]  # a 2D input gets 2D outputs
    if isinstance(hdr, nib.Nifti1Header):
        cls = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        new = hdr.copy()
        img = cls(arr, reference.affine, header=new)
        qcode = int(hdr["qform_code"])
        scode = int(hdr["sform_code"])
        img.set_qform(hdr.get_qform() if qcode else None, code=qcode)
        img.set_sform(hdr.get_sform() if scode else None, code=scode)
    else:
        img = nib.Nifti1Image(arr, reference.affine)
        img.set_qform(reference.affine, code=1)
        img.set_sform(reference.affine, code=1)
    img.set_data_dtype(arr.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    if arr.ndim == 4:
        img.header.set_intent("vector", (), name="per class")
    else:
        img.header.set_intent("none")
    out = Path(path)
    if not out.name.lower().endswith(".gz"):
        nib.save(img, str(out))
        return out
    with open(out, "wb") as raw, _gzip_writer(raw, compression_level, threads) as gz:
        img.to_file_map({"image": nib.FileHolder(fileobj=gz)})
    return out


def _load_quietly(p: Path) -> Any:
    with _quiet_nibabel():
        return nib.load(str(p))


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs the header fixes it makes (zero pixdim -> 1); we report them instead."""
    logger = nib.imageglobals.logger
    before, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = before


def _zero_pixdim_warnings(p: Path, header: Any, ndim: int) -> list[str]:
    """nibabel reads a zero pixdim as 1 mm; say so (the header on disk is re-read raw)."""
    if int(header["qform_code"]) or int(header["sform_code"]):
        return []  # the affine comes from qform/sform, not from pixdim alone
    try:
        with nib.openers.ImageOpener(str(p)) as f:
            raw = type(header).from_fileobj(f, check=False)
    except Exception:  # the file was readable a moment ago; nothing more to say
        return []
    zero = [i for i in range(1, min(ndim, 3) + 1) if float(raw["pixdim"][i]) == 0.0]
    if not zero:
        return []
    axes = ", ".join(f"pixdim[{i}]" for i in zero)
    return [f"{axes} = 0 in the header: voxel size taken as 1 mm; volumes in mL assume it"]


def write_niftis_like(
    items: Sequence[tuple[npt.NDArray[Any], str | os.PathLike[str]]],
    reference: Volume,
    *,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    threads: int | None = None,
) -> list[Path]:
    """:func:`write_nifti_like` for several ``(array, path)`` pairs at once.

    ``threads``: files written at once (default: one per file, at most the
    cores of this process); the cores left over compress blocks of each file
    (levels 1-3). Every file is attempted; the first error is raised after
    all have finished.
    """
    check_compression_level(compression_level)
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise UsageError(f"threads must be an integer >= 1 or None, got {threads!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(len(items), threads or cores or 1))
    per_file = max(1, (cores or 1) // workers)

    def one(item: tuple[npt.NDArray[Any], str | os.PathLike[str]]) -> Path:
        return write_nifti_like(
            item[0], reference, item[1], compression_level=compression_level, threads=per_file
        )

    if workers == 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="uqserve-nifti") as pool:
        futures = [pool.submit(one, item) for item in items]
    return [f.result() for f in futures]


def check_compression_level(level: int) -> None:
    """Raise ``UsageError`` unless ``level`` is an integer 0..9."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise UsageError(
            f"compression_level must be an integer from 0 (no compression) to 9 (smallest), "
            f"got {level!r}"
        )


def _gzip_writer(raw: IO[bytes], level: int, threads: int = 1) -> io.IOBase:
    """A gzip stream over ``raw``: no file name and mtime 0, so equal data give equal bytes.

    Levels 1-3 use ISA-L's threaded igzip when ``isal`` is installed (its
    levels 1-3; the output is the same for any ``threads`` >= 1), others zlib
    (0 stores without compression).
    """
    if 1 <= level <= 3:
        try:
            from isal import igzip_threaded
        except ImportError:  # isal has no wheel for this platform: zlib is slower, same format
            pass
        else:
            return _ForwardWriter(
                igzip_threaded.open(raw, "wb", compresslevel=level, threads=max(1, threads))
            )
    return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0)


class _ForwardWriter(io.IOBase):
    """A write-only stream that knows its position: nibabel seeks to where it already
    is (or past it, padding zeros), which the threaded gzip writer cannot."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__()
        self._stream = stream
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._stream.write(data)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self._pos + pos
        if whence not in (0, 1) or target < self._pos:
            raise OSError("a gzip output is written front to back; it cannot seek back")
        self.write(b"\0" * (target - self._pos))
        return self._pos

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._stream.close()  # joins the compressing threads, raises their error


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the third (NIfTI pads dims with 1)."""
    s = list(shape)
    while len(s) > 3 and s[-1] == 1:
        s.pop()
    return tuple(s)


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = "gzip data is corrupt" if isinstance(exc, zlib.error) else type(exc).__name__
    return f"{kind}: {msg}" if msg else kind
