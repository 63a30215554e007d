"""NIfTI reading/writing, the non-finite policy, read_volume dispatch, atomic outputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import SCAN_AFFINE, blob_volume, write_nifti
from uqserve.volumes import (
    OutputError,
    Volume,
    VolumeError,
    atomic_output_dir,
    read_nifti,
    read_volume,
    sanitize,
    write_nifti_like,
)
from uqserve.volumes.nifti import through_plane_axis


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("nifti2", [False, True])
def test_read_nifti_versions_and_suffixes(tmp_path: Path, suffix: str, nifti2: bool) -> None:
    data = blob_volume((12, 10, 4))
    path = write_nifti(tmp_path / f"s{suffix}", data, nifti2=nifti2)
    vol = read_nifti(path)
    assert vol.data.dtype == np.float32 and vol.shape == (12, 10, 4)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, SCAN_AFFINE)
    assert vol.meta["format"] == ("nifti2" if nifti2 else "nifti1")
    assert vol.slice_axis == 2
    assert vol.spacing == pytest.approx((0.8, 0.8, 3.0))


@pytest.mark.parametrize("dtype", [">f4", ">i2", "<u1", "<i4", "<f8", ">f8"])
def test_any_dtype_and_byte_order(tmp_path: Path, dtype: str) -> None:
    raw = (np.arange(6 * 5 * 3).reshape(6, 5, 3) % 97).astype(dtype)
    hdr = nib.Nifti1Header(endianness=dtype[0] if dtype[0] in "<>" else "=")
    img = nib.Nifti1Image(raw, SCAN_AFFINE, header=hdr)
    img.set_data_dtype(np.dtype(dtype))
    path = tmp_path / "e.nii"
    nib.save(img, str(path))
    assert nib.load(str(path)).header.endianness == (">" if dtype[0] == ">" else "<")
    vol = read_nifti(path)
    np.testing.assert_array_equal(vol.data, raw.astype(np.float32))


def test_int16_with_slope_and_intercept(tmp_path: Path) -> None:
    raw = np.arange(-20, 20, dtype=np.int16).reshape(4, 5, 2)
    img = nib.Nifti1Image(raw, SCAN_AFFINE)
    img.set_data_dtype(np.int16)
    plain = tmp_path / "plain.nii"
    nib.save(img, str(plain))
    # Set scl_slope / scl_inter in the stored header (bytes 112..119), as scanners do.
    blob = bytearray(plain.read_bytes())
    blob[112:120] = np.array([0.5, 10.0], "<f4").tobytes()
    path = tmp_path / "slope.nii.gz"
    path.write_bytes(gzip.compress(bytes(blob)))
    assert nib.load(str(path)).dataobj.slope == 0.5
    vol = read_nifti(path)
    np.testing.assert_allclose(vol.data, raw * 0.5 + 10.0)


def test_2d_image_is_one_slice_and_written_back_2d(tmp_path: Path) -> None:
    data = blob_volume((20, 16, 1))[:, :, 0]
    path = write_nifti(tmp_path / "slice.nii.gz", data)
    vol = read_nifti(path)
    assert vol.shape == (20, 16, 1) and vol.meta["ndim"] == 2 and vol.slice_axis == 2
    out = write_nifti_like(np.ones(vol.shape, np.uint8), vol, tmp_path / "o.nii.gz")
    assert nib.load(str(out)).shape == (20, 16)


def test_4d_needs_volume_index(tmp_path: Path) -> None:
    data = np.stack([blob_volume((8, 8, 3), seed=s) for s in range(3)], axis=-1)
    path = write_nifti(tmp_path / "series.nii.gz", data)
    with pytest.raises(VolumeError, match=r"4D series with 3 volumes.*`volume_index` 0\.\.2"):
        read_nifti(path)
    vol = read_nifti(path, volume_index=2)
    np.testing.assert_array_equal(vol.data, data[..., 2])
    assert vol.meta["volume_index"] == 2
    with pytest.raises(VolumeError, match="out of range"):
        read_nifti(path, volume_index=3)
    # A 4D file with one volume is simply 3D.
    single = write_nifti(tmp_path / "one.nii.gz", data[..., :1])
    assert read_nifti(single).shape == (8, 8, 3)
    with pytest.raises(VolumeError, match="given but the image is 3D"):
        read_nifti(single, volume_index=1)


@pytest.mark.parametrize("shape", [(7,), (3, 3, 3, 2, 2)])
def test_wrong_dimensionality(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = write_nifti(tmp_path / "x.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(VolumeError, match=r"\dD data"):
        read_nifti(path)


def test_unreadable_files(tmp_path: Path, scan: Path) -> None:
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all")
    with pytest.raises(VolumeError, match="not a readable NIfTI"):
        read_nifti(junk)
    # Truncated: a valid gzip stream cut in the voxel data.
    whole = gzip.decompress(scan.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(whole[: len(whole) // 2]))
    with pytest.raises(VolumeError, match="truncated or corrupt"):
        read_nifti(cut)
    cut_gz = tmp_path / "cut2.nii.gz"
    cut_gz.write_bytes(scan.read_bytes()[:-200])
    with pytest.raises(VolumeError, match=r"cut2\.nii\.gz"):
        read_nifti(cut_gz)
    other = tmp_path / "image.png"
    other.write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match="unsupported input"):
        read_volume(other)


def test_sanitize_policy() -> None:
    data = blob_volume((6, 6, 2))
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 0] = np.nan, np.inf, -np.inf
    vol = Volume(data=data, affine=SCAN_AFFINE, source="v")
    clean, n = sanitize(vol)
    assert n == 3 and clean.meta["nonfinite_voxels"] == 3
    finite_min = np.min(data[np.isfinite(data)])
    assert clean.data[0, 0, 0] == clean.data[1, 1, 1] == clean.data[2, 2, 0] == finite_min
    assert np.all(np.isfinite(clean.data))
    same, n0 = sanitize(clean)
    assert n0 == 0 and same is clean
    with pytest.raises(VolumeError, match="every voxel is NaN"):
        sanitize(
            Volume(data=np.full((3, 3, 1), np.nan, np.float32), affine=SCAN_AFFINE, source="v")
        )
    with pytest.raises(VolumeError, match="empty image"):
        sanitize(Volume(data=np.zeros((0, 3, 1), np.float32), affine=SCAN_AFFINE, source="v"))


def test_write_like_keeps_geometry(tmp_path: Path) -> None:
    qaff = SCAN_AFFINE.copy()
    saff = SCAN_AFFINE.copy()
    saff[:3, 3] += [1.0, 2.0, 3.0]  # sform differs from qform: both must survive
    img = nib.Nifti2Image(blob_volume((10, 9, 3)), saff)
    img.set_qform(qaff, code=1)
    img.set_sform(saff, code=4)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp_path / "in.nii.gz"))
    vol = read_nifti(tmp_path / "in.nii.gz")
    labels = (vol.data > 250).astype(np.uint8)
    out = nib.load(str(write_nifti_like(labels, vol, tmp_path / "seg.nii.gz")))
    assert isinstance(out, nib.Nifti2Image)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)
    np.testing.assert_allclose(out.header.get_qform(), qaff, atol=1e-6)
    np.testing.assert_allclose(out.header.get_sform(), saff, atol=1e-6)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 4
    assert out.header.get_xyzt_units() == ("mm", "sec")
    probs = np.random.default_rng(0).random((10, 9, 3, 4)).astype(np.float32)
    out4 = nib.load(str(write_nifti_like(probs, vol, tmp_path / "p.nii.gz")))
    assert out4.shape == (10, 9, 3, 4) and out4.get_data_dtype() == np.float32
    np.testing.assert_array_equal(out4.get_fdata(dtype=np.float32), probs)
    with pytest.raises(ValueError, match="does not match"):
        write_nifti_like(np.zeros((3, 3, 3)), vol, tmp_path / "bad.nii.gz")


def test_write_like_without_nifti_header(tmp_path: Path) -> None:
    vol = Volume(data=blob_volume((6, 5, 2)), affine=SCAN_AFFINE, source="dicom")
    out = nib.load(str(write_nifti_like(vol.data, vol, tmp_path / "x.nii.gz")))
    np.testing.assert_allclose(out.affine, SCAN_AFFINE)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1


def test_through_plane_axis_rule() -> None:
    assert through_plane_axis((0.8, 0.8, 3.0), (64, 64, 20)) == 2
    assert through_plane_axis((1.0, 1.0, 1.0), (64, 64, 20)) == 2
    assert through_plane_axis((3.0, 0.8, 0.8), (20, 64, 64)) == 0
    assert through_plane_axis((0.8, 3.0, 0.8), (64, 20, 64)) == 1
    assert through_plane_axis((3.0, 0.8, 0.8), (20, 64, 1)) == 2  # one slice: last axis
    assert through_plane_axis((1.0, 1.0, 1.0), (1, 64, 48)) == 0  # one slice stored first
    assert through_plane_axis((0.8, 0.8, 3.0), (64, 1, 48)) == 1


def test_atomic_output_dir(tmp_path: Path) -> None:
    final = tmp_path / "out" / "scan"
    with atomic_output_dir(final) as tmp:
        assert tmp.parent == final.parent and not final.exists()
        (tmp / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(OutputError, match="`overwrite=True`"), atomic_output_dir(final):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(final, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "1"  # untouched by the failed attempt
    with atomic_output_dir(final, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["scan"]  # no temp left
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        with atomic_output_dir(blocker / "scan"):
            pass


def test_read_volume_dicom_folder(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from tests.dicom_peers import phantom, write_ct_series

    hu = phantom((24, 20, 4), seed=2)
    syn = write_ct_series(tmp_path / "series", hu, spacing=(0.8, 0.7, 2.5))
    vol = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(vol.data, syn.hu)
    assert vol.slice_axis == 2
    with pytest.raises(VolumeError, match="not DICOM series"):
        read_volume(tmp_path / "series", volume_index=1)


# --------------------------------------------------------------------------- gzip outputs


@pytest.mark.parametrize("level", [0, 1, 3, 4, 9])
def test_gzip_outputs_hold_the_same_nifti_at_every_level(tmp_path: Path, level: int) -> None:
    vol = Volume(data=blob_volume((40, 36, 6)), affine=SCAN_AFFINE, source="s")
    tu = np.random.default_rng(level).gamma(0.3, 0.1, size=vol.shape).astype(np.float32)
    plain = write_nifti_like(tu, vol, tmp_path / "tu.nii")  # nibabel's own uncompressed file
    out = write_nifti_like(tu, vol, tmp_path / "tu.nii.gz", compression_level=level)
    blob = out.read_bytes()
    # one gzip member, no file name (FLG = 0), mtime 0: equal maps give equal bytes
    assert blob[:4] == b"\x1f\x8b\x08\x00" and blob[4:8] == b"\0\0\0\0"
    assert gzip.decompress(blob) == plain.read_bytes()
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), tu)
    again = write_nifti_like(tu, vol, tmp_path / "again.nii.gz", compression_level=level)
    assert again.read_bytes() == blob
    if level == 0:
        assert len(blob) > tu.nbytes  # stored
    else:
        assert len(blob) < tu.nbytes


@pytest.mark.parametrize("level", [1, 3])
def test_threaded_gzip_bytes_do_not_depend_on_threads(tmp_path: Path, level: int) -> None:
    # bigger than igzip_threaded's 1 MiB blocks, so that several blocks are compressed at once
    vol = Volume(data=blob_volume((96, 96, 40)), affine=SCAN_AFFINE, source="s")
    tu = np.random.default_rng(7).gamma(0.3, 0.1, size=vol.shape).astype(np.float32)
    blobs = {
        t: write_nifti_like(
            tu, vol, tmp_path / f"t{t}.nii.gz", compression_level=level, threads=t
        ).read_bytes()
        for t in (1, 2, 4)
    }
    assert blobs[1] == blobs[2] == blobs[4]
    assert gzip.decompress(blobs[4]) == write_nifti_like(tu, vol, tmp_path / "p.nii").read_bytes()


def test_gzip_level_is_validated(tmp_path: Path) -> None:
    from uqserve.errors import UsageError

    vol = Volume(data=blob_volume((6, 5, 2)), affine=SCAN_AFFINE, source="s")
    for bad in (-1, 10, 1.5, True):
        with pytest.raises(UsageError, match="compression_level must be an integer from 0"):
            write_nifti_like(vol.data, vol, tmp_path / "x.nii.gz", compression_level=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "x.nii.gz").exists()


def test_several_maps_written_in_parallel(tmp_path: Path) -> None:
    from uqserve.volumes import write_niftis_like

    vol = Volume(data=blob_volume((20, 18, 5)), affine=SCAN_AFFINE, source="s")
    maps = [(vol.data * k).astype(np.float32) for k in range(1, 6)]
    paths = write_niftis_like(
        [(m, tmp_path / f"m{k}.nii.gz") for k, m in enumerate(maps)], vol, threads=3
    )
    assert paths == [tmp_path / f"m{k}.nii.gz" for k in range(5)]
    for m, p in zip(maps, paths, strict=True):
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(p)).dataobj), m)
        serial = write_nifti_like(m, vol, tmp_path / "serial.nii.gz")
        assert serial.read_bytes() == p.read_bytes()
    # a bad map fails the call; the others are still written
    with pytest.raises(ValueError, match="does not match"):
        write_niftis_like(
            [(maps[0], tmp_path / "ok.nii.gz"), (np.zeros((2, 2, 2)), tmp_path / "bad.nii.gz")],
            vol,
        )
    assert (tmp_path / "ok.nii.gz").is_file()
