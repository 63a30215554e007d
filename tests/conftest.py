"""Shared fixtures: tiny real bundles and small synthetic NIfTI scans in temp folders."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import settings

from tests._bundles import make_tiny_bundle
from uqserve.schemas import validate

# Every run draws the same hypothesis examples (derandomized, seeded from each test's name) and
# never fails on timing; `--hypothesis-seed=N` explores other draws on demand (a derandomized
# profile would ignore the seed, hence the second profile), and the suite must pass for any N.
# No example database: a run does not depend on earlier runs.
settings.register_profile("uqserve", derandomize=True, deadline=None, database=None)
settings.register_profile("uqserve-seeded", derandomize=False, deadline=None, database=None)
settings.load_profile("uqserve")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("hypothesis_seed", default=None) is not None:
        settings.load_profile("uqserve-seeded")


SCAN_AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 90.0], [0.0, 0.8, 0.0, -120.0], [0.0, 0.0, 3.0, -40.0], [0, 0, 0, 1]],
    dtype=np.float64,
)


def blob_volume(shape: tuple[int, ...] = (40, 36, 5), seed: int = 0) -> npt.NDArray[np.float32]:
    """A dark background with one bright ellipsoid and mild noise, float32 ``[X, Y, Z]``."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum((g / 0.5) ** 2 for g in grids[:2])
    if len(shape) > 2:
        r2 = r2 + (grids[2] / 1.5) ** 2
    vol = 100.0 + 300.0 * (r2 < 1.0) + rng.normal(0.0, 20.0, shape)
    return vol.astype(np.float32)


SCHEMA_OF = {"report.json": "report", "manifest.json": "manifest"}


def validate_json_outputs(folder: Path) -> int:
    """Validate every report.json and manifest.json under ``folder``; return how many."""
    n = 0
    for path in sorted(folder.rglob("*.json")):
        kind = SCHEMA_OF.get(path.name)
        if kind is not None and path.is_file():
            validate(json.loads(path.read_text()), kind, source=str(path))  # type: ignore[arg-type]
            n += 1
    return n


_CHECKED: set[Path] = set()  # tmp_path folders the per-test check has seen (or skipped)


@pytest.fixture(autouse=True)
def _schema_valid_outputs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every report.json / manifest.json a test leaves in its tmp_path matches its schema."""
    # Requested before the test so that tmp_path is torn down after this check.
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if folder is not None:
        _CHECKED.add(folder)
        if not request.node.get_closest_marker("invalid_json_outputs"):
            validate_json_outputs(folder)


@pytest.fixture(scope="session", autouse=True)
def _schema_valid_session_outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same, at the end, for folders of session and module fixtures (shared bundles)."""
    yield
    base = tmp_path_factory.getbasetemp()
    # pytest's "<test>current" links point at folders already checked (or marked).
    seen = {p.resolve() for p in _CHECKED}
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and p.resolve() not in seen):
        validate_json_outputs(folder)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The sidecar CLI configures the root logger for its process (a handler on the
    stderr of the moment); in-process CLI tests must not leave it to later tests."""
    import logging

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    # Only plain StreamHandlers: pytest's own capture handlers (subclasses) come and go
    # around each test phase and are pytest's to remove.
    for handler in [h for h in root.handlers if h not in before]:
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny graphs: one torch thread is faster, and far faster on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ssn-ensemble, M=2, S=3, K=2: noise is exercised."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-ssn")


@pytest.fixture(scope="session")
def tiny_softmax_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """softmax-ensemble, M=3, S=1, K=2."""
    folder = tmp_path_factory.mktemp("bundles") / "tiny-softmax"
    return make_tiny_bundle(folder, au="softmax", num_members=3, num_samples=1)


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_bundle(name="b", **make_tiny_bundle_kwargs) -> Path``."""

    def make(name: str = "bundle", **kwargs: Any) -> Path:
        return make_tiny_bundle(tmp_path / "bundles" / name, **kwargs)

    return make


def write_nifti(
    path: Path,
    data: npt.NDArray[Any],
    affine: npt.NDArray[np.float64] = SCAN_AFFINE,
    *,
    nifti2: bool = False,
    slope: float | None = None,
    inter: float = 0.0,
) -> Path:
    """Write ``data`` as NIfTI-1/2 with qform and sform set (codes 1 and 2)."""
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    """A small 3D NIfTI-1 scan ``[40, 36, 5]`` (float32, .nii.gz)."""
    return write_nifti(tmp_path / "scan.nii.gz", blob_volume())
