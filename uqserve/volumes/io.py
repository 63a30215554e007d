"""Reading any supported input, and writing outputs atomically.

``read_volume`` dispatches on the path: a ``.nii`` / ``.nii.gz`` file goes to
the NIfTI reader, a folder (or a single ``.dcm`` file) to the DICOM series
reader (imported lazily: pydicom is an optional extra). ``atomic_output_dir``
builds a result folder under a temporary name and renames it into place only
when everything inside was written, so a failure never leaves partial output.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from uqserve import _failpoints
from uqserve._fs import replace_dir_atomically
from uqserve.errors import UsageError
from uqserve.volumes.base import Volume, VolumeError
from uqserve.volumes.nifti import is_nifti_path, read_nifti


class OutputError(UsageError):
    """An output location that cannot be used (exists, not writable)."""


def read_volume(
    path: str | os.PathLike[str],
    volume_index: int | None = None,
    *,
    max_voxels: int | None = None,
) -> Volume:
    """Read a NIfTI file or a folder of DICOM files of one series into a ``Volume``.

    ``volume_index`` picks one volume of a 4D NIfTI series. ``max_voxels``
    caps the size read (default ``$UQSERVE_MAX_VOXELS`` or 256 Mi voxels),
    checked before allocating. Raises ``VolumeError`` (``InputTooLargeError``
    over the limit).
    """
    p = Path(path)
    volume = _read(p, volume_index, max_voxels)
    _failpoints.reached("read")
    return volume


def _read(p: Path, volume_index: int | None, max_voxels: int | None) -> Volume:
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder")
    if p.is_dir() or p.suffix.lower() == ".dcm":
        if volume_index not in (None, 0):
            raise VolumeError(f"{p}: `volume_index` applies to 4D NIfTI files, not DICOM series")
        try:
            from uqserve.volumes.dicom import read_series
        except ImportError as exc:
            raise VolumeError(
                f"{p}: reading DICOM needs the dicom extra: pip install 'uqserve[dicom]' ({exc})"
            ) from exc
        series = read_series(p if p.is_dir() else [p], max_voxels=max_voxels)
        return series.volume
    if is_nifti_path(p):
        return read_nifti(p, volume_index=volume_index, max_voxels=max_voxels)
    raise VolumeError(
        f"{p}: unsupported input; pass a NIfTI file (.nii, .nii.gz) or a folder of DICOM files"
    )


def sanitize(volume: Volume) -> tuple[Volume, int]:
    """Apply the non-finite voxel policy; return the volume and the count replaced.

    NaN and ±Inf voxels (common outside the field of view of resampled scans)
    are replaced by the minimum finite value, and the count is returned so the
    caller can warn. A volume with no finite voxel, or an empty one, raises
    ``VolumeError``.
    """
    data = volume.data
    if data.size == 0:
        raise VolumeError(f"{volume.source}: empty image (shape {data.shape}); nothing to predict")
    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad == 0:
        return volume, 0
    if n_bad == data.size:
        raise VolumeError(
            f"{volume.source}: every voxel is NaN or infinite; the file holds no image data"
        )
    fill = np.float32(data[finite].min())
    clean: npt.NDArray[np.float32] = np.where(finite, data, fill).astype(np.float32, copy=False)
    out = Volume(
        data=clean,
        affine=volume.affine,
        source=volume.source,
        header=volume.header,
        slice_axis=volume.slice_axis,
        meta={**volume.meta, "nonfinite_voxels": n_bad},
    )
    return out, n_bad


# NAME_MAX of Linux file systems (ext4, xfs, btrfs, tmpfs): bytes in one path component.
_NAME_MAX = 255


@contextlib.contextmanager
def atomic_output_dir(
    final_dir: str | os.PathLike[str],
    overwrite: bool = False,
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``final_dir``; rename it on success.

    Raises ``OutputError`` up front when ``final_dir`` exists and ``overwrite``
    is false, or when its parent cannot be created or written. On any error
    inside the block the temporary folder is removed and ``final_dir`` is left
    untouched. With ``overwrite`` an existing ``final_dir`` is replaced only
    after the new one is complete. ``final_dir`` must not be, nor hold, any of
    ``inputs`` (the files being read): replacing it would delete them.
    """
    final = Path(final_dir)
    for source in inputs:
        _check_not_input(final, Path(source))
    if len(os.fsencode(final.name)) > _NAME_MAX:
        raise OutputError(
            f"{final}: the scan's name is {len(os.fsencode(final.name))} bytes, more than a "
            f"folder name may have ({_NAME_MAX}); rename the scan"
        )
    if os.path.lexists(final) and not overwrite:  # a dangling symlink counts too
        raise OutputError(
            f"{final}: results exist already; pass `overwrite=True` or choose another `out_dir`"
        )
    if final.exists() and not final.is_dir():
        raise OutputError(
            f"{final}: exists and is not a folder; remove it or choose another `out_dir`"
        )
    try:
        with contextlib.ExitStack() as stack:
            try:
                tmp = stack.enter_context(replace_dir_atomically(final, overwrite=overwrite))
            except OSError as exc:
                raise OutputError(
                    f"{final.parent}: cannot create the output folder ({exc.strerror or exc}); "
                    "choose a writable `out_dir`"
                ) from exc
            yield tmp
    except FileExistsError as exc:
        if exc.filename != str(final):
            raise
        # Another writer committed between our start-up check and our rename.
        raise OutputError(
            f"{final}: another run wrote results there meanwhile; they were kept. "
            "Pass `overwrite=True` to replace them, or choose another `out_dir`"
        ) from exc


def _check_not_input(final: Path, source: Path) -> None:
    """``OutputError`` when ``final`` is ``source`` or a folder that holds it."""
    fin, src = final.resolve(), source.resolve()
    if fin == src or fin in src.parents:
        raise OutputError(
            f"{final}: the results would replace the input {source}; choose another -o"
        )
