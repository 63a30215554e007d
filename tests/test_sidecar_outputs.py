"""DICOM results built from synthetic arrays: content round trips, references, validity."""

from __future__ import annotations

import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.dicom_peers import dciodvfy, phantom, write_ct_series
from uqserve.sidecar.outputs import (
    OutputOptions,
    build_outputs,
    derived_uid,
    make_parametric_map,
    make_segmentation,
    write_datasets,
)
from uqserve.volumes.dicom import DicomSeries, read_series

CLASSES = ("background", "lesion", "edema")
REPORT = {
    "bundle": {"name": "tiny", "classes": list(CLASSES), "manifest_sha256": "ab" * 32},
    "seed": 0,
    "ood": {"score": 0.031, "threshold": 0.02, "flag": True, "percentile": 99.0},
    "entanglement": {"scan": 0.41, "bundle": None},
    "volumes": {
        "lesion": {"mean_ml": 1.25, "std_ml": 0.1, "ci95_ml": [1.05, 1.43], "n_samples": 6},
        "edema": {"mean_ml": 0.5, "std_ml": 0.05, "ci95_ml": [0.41, 0.6], "n_samples": 6},
    },
}


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> DicomSeries:
    folder = tmp_path_factory.mktemp("ct")
    # An oblique series, so frame order and geometry matter.
    write_ct_series(
        folder,
        phantom((48, 40, 6), seed=4),
        orientation=(0.0, 0.8660254, -0.5, 0.0, 0.5, 0.8660254),
    )
    return read_series(folder)


def _arrays(series: DicomSeries, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = series.volume.shape
    prob = rng.dirichlet(np.ones(len(CLASSES)), size=shape).astype(np.float32)  # [X, Y, Z, K]
    prob = np.moveaxis(prob, -1, 0)
    seg = np.argmax(prob, axis=0).astype(np.uint8)
    tu = -(prob * np.log(prob)).sum(0).astype(np.float32)
    au = (tu * rng.uniform(0.5, 1.0, shape)).astype(np.float32)
    return {"prob": prob, "seg": seg, "tu": tu, "au": au, "eu": (tu - au).astype(np.float32)}


def _by_source(ds: pydicom.Dataset, series: DicomSeries) -> np.ndarray:
    """Frames ``[Z, rows, cols]`` reordered to the source order via each frame's source image."""
    uids = [str(s.SOPInstanceUID) for s in series.datasets]
    order = {}
    for i, f in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        order[uids.index(str(src))] = i
    return np.asarray(ds.pixel_array[[order[k] for k in range(len(uids))]])


def test_binary_seg_round_trip(series: DicomSeries) -> None:
    a = _arrays(series)
    seg = make_segmentation(series.datasets, a["seg"], CLASSES, key="k")
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion", "edema"]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in series.datasets],
        combine_segments=True,
    )
    np.testing.assert_array_equal(np.transpose(back, (2, 1, 0)), a["seg"])
    assert seg.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert seg.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID


def test_labelmap_seg_round_trip(series: DicomSeries) -> None:
    a = _arrays(series)
    seg = make_segmentation(
        series.datasets, a["seg"], CLASSES, key="k", options=OutputOptions(seg_type="labelmap")
    )
    assert seg.SegmentationType == "LABELMAP"
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in series.datasets],
        combine_segments=True,
    )
    np.testing.assert_array_equal(np.transpose(back, (2, 1, 0)), a["seg"])


def test_parametric_map_values_and_mapping(series: DicomSeries) -> None:
    a = _arrays(series)
    pm = make_parametric_map(series.datasets, a["eu"], "eu", num_classes=3, key="k")
    np.testing.assert_array_equal(np.transpose(_by_source(pm, series), (2, 1, 0)), a["eu"])
    assert pm.pixel_array.dtype == np.float32
    shared = pm.SharedFunctionalGroupsSequence[0]
    rwvm = shared.RealWorldValueMappingSequence[0]
    assert rwvm.LUTLabel == "EU"
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "{nat}"
    assert rwvm.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert float(rwvm.RealWorldValueSlope) == 1.0 and float(rwvm.RealWorldValueIntercept) == 0.0
    voi = shared.FrameVOILUTSequence[0]
    assert math.isclose(float(voi.WindowWidth), math.log(3), rel_tol=1e-9)
    assert pm.RecognizableVisualFeatures == "NO"


def test_build_outputs_files_validate_and_uids_are_stable(
    series: DicomSeries, tmp_path: Path
) -> None:
    a = _arrays(series)
    kw = dict(seg=a["seg"], maps=a, prob=a["prob"], classes=CLASSES, report=REPORT)
    opts = OutputOptions(fractional=True, model_name="tiny")
    out = build_outputs(series.datasets, key="bundle:0", options=opts, **kw)  # type: ignore[arg-type]
    assert [str(d.get("ContentLabel", d.Modality)) for d in out] == [
        "SEGMENTATION",
        "TU",
        "AU",
        "EU",
        "PROBABILITY",
        "SR",
    ]
    again = build_outputs(series.datasets, key="bundle:0", options=opts, **kw)  # type: ignore[arg-type]
    assert [d.SOPInstanceUID for d in out] == [d.SOPInstanceUID for d in again]
    other = build_outputs(series.datasets, key="bundle:1", options=opts, **kw)  # type: ignore[arg-type]
    assert not {d.SOPInstanceUID for d in out} & {d.SOPInstanceUID for d in other}
    assert len({d.SeriesInstanceUID for d in out}) == len(out)  # one series per result kind
    # Fractional SEG: probabilities quantised to 1/255.
    frac = hd.seg.Segmentation.from_dataset(out[4])
    p = frac.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in series.datasets],
        segment_numbers=[1],
    )[..., 0]
    np.testing.assert_allclose(np.transpose(p, (2, 1, 0)), a["prob"][1], atol=0.5 / 255 + 1e-6)
    # The SR carries the facts, coded and numeric.
    sr = out[5]
    items = {str(it.ConceptNameCodeSequence[0].CodeMeaning): it for it in sr.ContentSequence}
    assert items["Out of distribution"].ConceptCodeSequence[0].CodeMeaning == "Yes"
    assert float(
        items["OOD score (image-level EU)"].MeasuredValueSequence[0].NumericValue
    ) == pytest.approx(0.031)
    assert float(
        items["lesion volume, 97.5 % quantile"].MeasuredValueSequence[0].NumericValue
    ) == pytest.approx(1.43)
    assert (
        "UNUSUAL" in items["Summary"].TextValue
        and "lesion volume 1.25 mL" in items["Summary"].TextValue
    )
    evidence = {
        str(s.SeriesInstanceUID)
        for ev in sr.CurrentRequestedProcedureEvidenceSequence
        for s in ev.ReferencedSeriesSequence
    }
    assert series.series_uid in evidence and str(out[0].SeriesInstanceUID) in evidence
    # Files: written atomically, valid per dciodvfy.
    paths = write_datasets(out, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    for path in paths:
        errors, _ = dciodvfy(path)
        assert not errors, f"{path.name}: {errors}"
    assert pydicom.dcmread(paths[0]).SOPInstanceUID == out[0].SOPInstanceUID


def test_bad_arrays_are_refused(series: DicomSeries) -> None:
    a = _arrays(series)
    with pytest.raises(ValueError, match=r"shape .* \[X, Y, Z\]"):
        make_segmentation(series.datasets, a["seg"].transpose(1, 0, 2), CLASSES, key="k")
    with pytest.raises(ValueError, match="only 2 classes"):
        make_segmentation(series.datasets, a["seg"], CLASSES[:2], key="k")
    bad = a["tu"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make_parametric_map(series.datasets, bad, "tu", num_classes=3, key="k")
    with pytest.raises(ValueError, match="kind"):
        make_parametric_map(series.datasets, a["tu"], "xx", num_classes=3, key="k")
    with pytest.raises(ValueError, match="seg_type"):
        OutputOptions(seg_type="fractional")
    with pytest.raises(ValueError, match="maps lacks eu"):
        build_outputs(
            series.datasets,
            seg=a["seg"],
            maps={"tu": a["tu"], "au": a["au"]},
            classes=CLASSES,
            key="k",
        )


def test_derived_uid_is_valid() -> None:
    uid = derived_uid("x", 1)
    assert uid == derived_uid("x", 1) != derived_uid("x", 2)
    assert len(uid) <= 64 and uid.startswith("2.25.")
    assert pydicom.uid.UID(uid).is_valid
