"""The JSON Schemas of report.json and manifest.json: valid, in step with the code, strict.

Every report.json / manifest.json any test leaves in its temp folders is also
validated, by the autouse fixtures in conftest.py.
"""

from __future__ import annotations

import copy
import json
import re
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import validate_json_outputs
from uqserve.bundle import (
    AGGREGATORS,
    AU_METHODS,
    BUNDLES_DIR,
    EU_METHODS,
    NORMALIZATIONS,
    Manifest,
    Member,
    load_bundle,
    shipped_bundles,
)
from uqserve.prediction import predict, predict_volume
from uqserve.schemas import SchemaValidationError, schema, validate
from uqserve.volumes import read_volume


@pytest.mark.parametrize("kind", ["report", "manifest"])
def test_schemas_are_valid_draft_2020_12(kind: str) -> None:
    s = schema(kind)  # type: ignore[arg-type]
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)


@pytest.mark.parametrize("name", shipped_bundles())
def test_shipped_manifests_are_valid(name: str) -> None:
    validate(json.loads((BUNDLES_DIR / name / "manifest.json").read_text()), "manifest", name)


def test_shipped_bundles_exist() -> None:
    assert len(shipped_bundles()) >= 2


def test_fresh_predict_report_is_valid(tiny_bundle: Path, scan: Path, tmp_path: Path) -> None:
    [result] = predict([scan], tmp_path / "out", tiny_bundle, seed=1, png=True)
    report = json.loads((result.out_dir / "report.json").read_text())
    validate(report, "report", "report.json")
    assert {"sha256", "name"} <= report["scan"].keys() and "outputs" in report
    # The in-memory report (Python API) lacks only the file facts, and is valid too.
    pred = predict_volume(read_volume(scan), tiny_bundle, seed=1)
    validate(pred.report, "report", "Prediction.report")
    assert validate_json_outputs(tmp_path) == 1


def _manifest(**changes: Any) -> dict[str, Any]:
    d = json.loads((BUNDLES_DIR / shipped_bundles()[0] / "manifest.json").read_text())
    d.update(changes)
    return d


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"au": "bayes"}, "au"),
        ({"num_members": 0}, "num_members"),
        ({"classes": ["background"]}, "classes"),
        ({"default_aggregator": "max"}, "default_aggregator"),
        ({"members": [{"file": "m.onnx", "sha256": "abc"}]}, "members/0/sha256"),
        ({"au": "softmax", "num_samples": 4}, "num_samples"),
        ({"eu": "none"}, "num_members"),
        ({"schema_version": 4}, "schema_version"),
        ({"created": "yesterday"}, "created"),
        ({"colour": "blue"}, "(top level)"),
    ],
)
def test_manifest_schema_rejects(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(
        SchemaValidationError, match=rf"^m\.json: manifest field {re.escape(field)}: "
    ):
        validate(_manifest(**changes), "manifest", "m.json")


def test_report_schema_rejects(tiny_bundle: Path, scan: Path) -> None:
    good = predict_volume(read_volume(scan), tiny_bundle, seed=1).report
    validate(good, "report")
    cases = [
        (("scan",), "pop", "(top level)"),
        (("ood", "flag"), "yes", "ood/flag"),
        (("scores", "aggregator"), "median", "scores/aggregator"),
        (("bundle", "manifest_sha256"), "xyz", "bundle/manifest_sha256"),
        (("timings", "gpu_s"), 1.0, "timings"),
    ]
    for path, value, field in cases:
        bad = copy.deepcopy(good)
        parent = bad
        for key in path[:-1]:
            parent = parent[key]
        if value == "pop":
            parent.pop(path[-1])
        else:
            parent[path[-1]] = value
        with pytest.raises(SchemaValidationError, match=rf"report field {re.escape(field)}: "):
            validate(bad, "report")


def test_manifest_schema_matches_the_manifest_class() -> None:
    """Same fields, same enums and the same defaults as uqserve.bundle.Manifest."""
    s = schema("manifest")
    minimal = Manifest(
        name="b", au="ssn", eu="ensemble", num_members=1, num_samples=2,
        classes=("background", "fg"), members=(Member("m.onnx", "0" * 64),),
    ).to_dict()  # fmt: skip
    assert set(s["properties"]) == set(minimal)
    assert set(s["required"]) == {
        "name",
        "au",
        "eu",
        "num_members",
        "num_samples",
        "classes",
        "members",
    }
    for key, spec in s["properties"].items():
        if "default" in spec:
            assert spec["default"] == minimal[key], key
    defs = s["$defs"]
    assert defs["au_method"]["enum"] == list(AU_METHODS)
    assert defs["eu_method"]["enum"] == list(EU_METHODS)
    assert defs["aggregator"]["enum"] == list(AGGREGATORS)
    assert defs["normalization"]["properties"]["scheme"]["enum"] == list(NORMALIZATIONS)
    blocks = {
        "input": minimal["input"],
        "normalization": minimal["input"]["normalization"],
        "ood": minimal["ood"],
    }
    for block, sub in blocks.items():
        props = defs[block]["properties"]
        assert set(props) == set(sub), block
        for key, spec in props.items():
            if "default" in spec:
                want = list(sub[key]) if isinstance(sub[key], tuple) else sub[key]
                assert spec["default"] == want, (block, key)
    assert schema("report")["$defs"]["aggregator"]["enum"] == list(AGGREGATORS)


def test_loaded_manifest_round_trips_valid() -> None:
    """What write_manifest would write for a shipped bundle validates."""
    written = json.dumps(load_bundle(shipped_bundles()[0]).manifest.to_dict())
    validate(json.loads(written), "manifest")


def test_report_schema_matches_the_report_type() -> None:
    """Same keys, and the same required keys, as the TypedDicts of uqserve.prediction.report."""
    from uqserve.prediction import report as r

    s = schema("report")
    blocks: dict[str, tuple[Any, dict[str, Any]]] = {
        "report": (r.Report, s),
        "scan": (r.ScanInfo, s["properties"]["scan"]),
        "bundle": (r.BundleInfo, s["properties"]["bundle"]),
        "runtime": (r.RuntimeInfo, s["properties"]["runtime"]),
        "scores": (r.ImageScores, s["properties"]["scores"]),
        "ood": (r.OodInfo, s["properties"]["ood"]),
        "entanglement": (r.Entanglement, s["properties"]["entanglement"]),
        "volumes": (r.VolumeStats, s["properties"]["volumes"]["additionalProperties"]),
        "timings": (r.Timings, s["properties"]["timings"]),
        "outputs": (r.Outputs, s["properties"]["outputs"]),
        "geometry": (r.FrameInfo, s["properties"]["geometry"]),
    }
    for name, (typed, spec) in blocks.items():
        # Evaluated hints: the module's string annotations hide NotRequired from the TypedDict.
        hints = typing.get_type_hints(typed, include_extras=True)
        optional = {k for k, h in hints.items() if typing.get_origin(h) is typing.NotRequired}
        assert set(spec["properties"]) == set(hints), name
        assert set(spec["required"]) == set(hints) - optional, name
        assert spec["additionalProperties"] is False, name


def test_manifest_schema_describes_every_validation_key() -> None:
    from uqserve.calibration import VALIDATION_KEYS

    described = schema("manifest")["$defs"]["validation"]["properties"]
    assert set(VALIDATION_KEYS) <= set(described)


def test_every_field_is_described() -> None:
    # The schema page lists every field of report.json and manifest.json with its description.
    import importlib.util

    pytest.importorskip("mkdocs", reason="docs/hooks.py needs the docs extra")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("hooks", root / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    for name in ("report", "manifest"):
        schema = json.loads((hooks.SCHEMAS / f"{name}.schema.json").read_text())
        fields = hooks._fields(schema, schema, "")
        undescribed = [path for path, sub, _ in fields if not sub.get("description")]
        assert len(fields) > 50 and not undescribed, f"{name}: {undescribed}"
