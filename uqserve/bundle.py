"""Bundle manifest: schema, loading, writing and checksum verification.

A bundle is a folder holding ``manifest.json`` and one ONNX graph per member
(see ``docs/architecture.md`` for the member-graph signature). This module is
pure Python + JSON (numpy for normalisation): no onnxruntime, no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve._fs import atomic_write_text, read_json_object
from uqserve.contracts import AGGREGATORS, AU_METHODS, DEFAULT_AGGREGATOR, EU_METHODS
from uqserve.errors import UsageError

# Version 3 added input.pad, input.blend and input.gaussian. A reader ignores fields it does
# not know, so a manifest that needs them says 3 (older readers refuse it instead of padding
# and blending the old way); one that keeps their defaults is still written as 2.
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
NORMALIZATIONS = ("fixed", "zscore", "ct")
INTERPOLATIONS = ("cubic", "linear")
PAD_MODES = ("reflect", "constant")
BLENDS = ("probabilities", "logits")
GAUSSIANS = ("centred", "nnunet")

#: A bundle's name becomes Triton model names and folder names in a model
#: repository, so it follows Triton's model-name rules strictly: letters,
#: digits, ``_``, ``-`` and ``.``, starting with a letter or digit (never a
#: path: no ``/``, ``..`` or control characters), at most 64 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Where shipped bundles live (package data).
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
DEFAULT_BUNDLE = "softmax-ensemble"


class BundleError(UsageError):
    """A bundle that cannot be used; the message names the file and the fix."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a bundle name (:data:`NAME_PATTERN`), or None."""
    if NAME_PATTERN.fullmatch(name):
        return None
    return (
        f"name {name!r} is not a valid bundle name: use 1-64 letters, digits, '_', '-' or '.', "
        "starting with a letter or digit (it becomes Triton model and folder names); "
        "choose another name (uqserve export --name)"
    )


def member_file_problem(file: str) -> str | None:
    """Why ``file`` cannot be a member file (it must stay inside the bundle), or None."""
    parts = Path(file).parts
    if not file or Path(file).is_absolute() or ".." in parts or "\\" in file or "\x00" in file:
        return (
            f"member file {file!r} is not a file name inside the bundle folder "
            "(no absolute paths, no '..')"
        )
    return None


@dataclass(frozen=True)
class Member:
    """One member graph: ``file`` relative to the bundle folder."""

    file: str
    sha256: str


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation applied by the client before inference.

    ``fixed``: ``(clip(x, *clip) - mean) / std`` with constants from training data.
    ``zscore``: per-volume ``(x - mean(x)) / std(x)`` (``clip`` applied first if set);
    with ``nonzero`` the mean and std are measured inside the scan's nonzero
    mask and voxels outside it become 0 (nnU-Net's ``use_mask_for_norm``).
    ``ct``: nnU-Net's CT scheme, ``(clip(x, p0.5, p99.5) - mean) / std`` with the
    percentiles (``clip``, required), mean and std of the training foreground.
    """

    scheme: str = "fixed"
    mean: float = 0.0
    std: float = 1.0
    clip: tuple[float, float] | None = None
    nonzero: bool = False

    def shift_scale(self, x: npt.NDArray[np.floating[Any]] | None = None) -> tuple[float, float]:
        """``(shift, scale)`` so that the graph input is ``(clip(x) - shift) * scale``.

        ``fixed`` needs no data; ``zscore`` measures ``x`` (the whole volume, or one
        image). A constant ``x`` gets scale 1 rather than a division by zero.
        """
        if self.scheme in ("fixed", "ct"):
            return float(self.mean), 1.0 / float(self.std)
        if x is None:
            raise UsageError("z-score normalisation needs the image to measure")
        if self.clip is not None:
            x = np.clip(x, *self.clip)
        mu = float(np.mean(x, dtype=np.float64))
        with np.errstate(over="ignore"):
            sd = float(np.sqrt(np.mean((x - np.float32(mu)) ** 2, dtype=np.float64)))
        if not math.isfinite(sd):
            # Squares of extreme intensities (|x| > 1.8e19) overflow float32: redo in float64.
            sd = float(np.sqrt(np.var(x, dtype=np.float64)))
        return mu, (1.0 / sd if sd > 0 else 1.0)


@dataclass(frozen=True)
class Padding:
    """How an image smaller than the window is padded up to it (after normalisation).

    mode    ``reflect`` (mirror the image) or ``constant`` (``value``)
    value   the constant of ``constant`` padding, in normalised units
    centre  split the padding evenly before and after (nnU-Net's ``pad_nd_image``;
            the extra voxel of an odd amount after); False: all after the image
    """

    mode: str = "reflect"
    value: float = 0.0
    centre: bool = False


def written_schema_version(spec: InputSpec) -> int:
    """The oldest schema version whose readers run a bundle with this input correctly."""
    default = InputSpec()
    new = (spec.pad, spec.blend, spec.gaussian) != (default.pad, default.blend, default.gaussian)
    return SCHEMA_VERSION if new else 2


@dataclass(frozen=True)
class InputSpec:
    """What the member graphs expect: channels, tiles, geometry and intensities.

    dims           2: the graphs see slices ``[H, W]``; 3: volumes ``[D, H, W]``
    tile_size      the smallest slice ``[H, W]`` a graph is fed (smaller ones are padded)
    multiple       slice sizes are padded to a multiple of this
    patch          the window the graphs see (``dims`` sizes); larger images are
                   cut into overlapping windows; None: whole slices
    spacing        target voxel size in mm along the model's axes (``dims`` values:
                   ``[rows, cols]`` of a slice, or ``[D, H, W]``); None: the scan's own
    orientation    the axis codes the model was trained in (e.g. ``"RAS"``: array
                   axis 0 points right, ...); None: as stored
    interpolation  how the image is resampled: ``cubic`` or ``linear``
    slice_axis     ``dims`` 2: the array axis slices are cut along (of the model's
                   orientation, or of the scan as stored without one), as the
                   model was trained (nnU-Net's ``transpose_forward[0]``); None:
                   the scan's through-plane (thickest) axis
    crop_nonzero   crop each scan to the bounding box of its nonzero voxels before
                   normalisation and resampling, as nnU-Net does (outside the box:
                   background, zero uncertainty)
    pad            how images smaller than the window are padded (:class:`Padding`)
    blend          how overlapping windows are blended: ``probabilities`` (each
                   member's probabilities, Gaussian-weighted) or ``logits`` (its
                   log-probabilities, i.e. logits up to a per-voxel constant,
                   Gaussian-weighted, softmax after; softmax members only)
    gaussian       the window weights: ``centred`` (sigma = patch / 8 about the
                   window's centre, peak 1, float32) or ``nnunet`` (nnU-Net's
                   ``compute_gaussian``: centre ``patch // 2``, peak 10, float16)
    """

    channels: int = 1
    tile_size: tuple[int, int] = (128, 128)
    multiple: int = 16
    dims: int = 2
    patch: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    interpolation: str = "cubic"
    normalization: Normalization = field(default_factory=Normalization)
    crop_nonzero: bool = False
    slice_axis: int | None = None
    pad: Padding = field(default_factory=Padding)
    blend: str = "probabilities"
    gaussian: str = "centred"

    def problems(self) -> list[str]:
        """What is inconsistent in the geometry fields (empty when all is well)."""
        out = []
        if self.channels < 1:
            out.append(f"input.channels must be >= 1, got {self.channels}")
        if len(self.tile_size) != 2 or any(t < 1 for t in self.tile_size):
            out.append(f"input.tile_size must be two sizes >= 1, got {list(self.tile_size)}")
        if self.multiple < 1:
            out.append(f"input.multiple must be >= 1, got {self.multiple}")
        if self.dims not in (2, 3):
            out.append(f"input.dims must be 2 or 3, got {self.dims}")
        if self.patch is not None and (
            len(self.patch) != self.dims or any(p < 1 for p in self.patch)
        ):
            out.append(f"input.patch must be {self.dims} sizes >= 1, got {list(self.patch)}")
        if self.dims == 3 and self.patch is None:
            out.append("input.patch is required for dims 3 (the window the graphs see)")
        if self.spacing is not None and (
            len(self.spacing) != self.dims or not all(0 < s < 1e4 for s in self.spacing)
        ):
            out.append(f"input.spacing must be {self.dims} sizes in mm, got {list(self.spacing)}")
        if self.orientation is not None and not _axcodes_ok(self.orientation):
            out.append(
                f"input.orientation {self.orientation!r} must be three axis codes, one of "
                "R/L, A/P, S/I each (e.g. 'RAS')"
            )
        if self.slice_axis is not None and (self.dims != 2 or self.slice_axis not in (0, 1, 2)):
            out.append(f"input.slice_axis must be 0, 1 or 2 for dims 2, got {self.slice_axis}")
        if self.interpolation not in INTERPOLATIONS:
            out.append(f"input.interpolation must be one of {', '.join(INTERPOLATIONS)}")
        if self.pad.mode not in PAD_MODES:
            out.append(f"input.pad.mode must be one of {', '.join(PAD_MODES)}")
        if not math.isfinite(self.pad.value):
            out.append(f"input.pad.value must be a finite number, got {self.pad.value}")
        if self.blend not in BLENDS:
            out.append(f"input.blend must be one of {', '.join(BLENDS)}")
        if self.gaussian not in GAUSSIANS:
            out.append(f"input.gaussian must be one of {', '.join(GAUSSIANS)}")
        norm = self.normalization
        if norm.scheme not in NORMALIZATIONS:
            out.append(f"normalization {norm.scheme!r} unknown")
        if not (math.isfinite(norm.std) and norm.std > 0):  # NaN <= 0 is False
            out.append(f"normalization std must be a finite number > 0, got {norm.std}")
        if not math.isfinite(norm.mean):
            out.append(f"normalization mean must be a finite number, got {norm.mean}")
        if norm.clip is not None and not (
            all(math.isfinite(c) for c in norm.clip) and norm.clip[0] < norm.clip[1]
        ):
            out.append(f"normalization clip must be two finite numbers, low < high: {norm.clip}")
        if norm.scheme == "ct" and norm.clip is None:
            out.append("normalization 'ct' needs clip (the dataset's 0.5 and 99.5 percentiles)")
        if norm.nonzero and norm.scheme != "zscore":
            out.append("normalization nonzero applies to the 'zscore' scheme only")
        return out


def _axcodes_ok(code: str) -> bool:
    axes = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    return len(code) == 3 and all(c in axes for c in code) and len({axes[c] for c in code}) == 3


@dataclass(frozen=True)
class OODSpec:
    """OOD flag: ``score > threshold`` with score = image-level EU under ``aggregator``."""

    aggregator: str = DEFAULT_AGGREGATOR
    threshold: float | None = None
    quantile: float = 0.95
    validation_scores: tuple[float, ...] = ()

    def problems(self) -> list[str]:
        """What is wrong with the numbers (NaN passes every comparison, so test finiteness)."""
        out = []
        if self.threshold is not None and not math.isfinite(self.threshold):
            out.append(
                f"ood.threshold must be a finite number (or absent: not calibrated), got "
                f"{self.threshold}; re-run `uqserve calibrate`"
            )
        if not 0 < self.quantile <= 1:  # False for NaN
            out.append(f"ood.quantile must lie in (0, 1], got {self.quantile}")
        if not all(math.isfinite(v) for v in self.validation_scores):
            out.append("ood.validation_scores must be finite numbers")
        return out


@dataclass(frozen=True)
class Manifest:
    """Everything a client needs to run and interpret a bundle."""

    name: str
    au: str
    eu: str
    num_members: int
    num_samples: int
    classes: tuple[str, ...]
    members: tuple[Member, ...]
    input: InputSpec = field(default_factory=InputSpec)
    seed: int = 0
    default_aggregator: str = DEFAULT_AGGREGATOR
    ood: OODSpec = field(default_factory=OODSpec)
    # Free-form facts measured at export/calibration time (validation statistics,
    # bundle-level entanglement Δ scores, thresholds for the `threshold` aggregator).
    validation: dict[str, Any] = field(default_factory=dict)
    entanglement: dict[str, Any] = field(default_factory=dict)
    opset: int = 18
    uqserve_version: str = ""
    schema_version: int = SCHEMA_VERSION
    manifest_version: int = 1
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def combination(self) -> str:
        return f"{self.au}-{self.eu}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["members"] = [asdict(m) for m in self.members]
        for key in ("tile_size", "patch", "spacing"):
            if d["input"][key] is not None:
                d["input"][key] = list(d["input"][key])
        d["schema_version"] = written_schema_version(self.input)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        try:
            version = int(d.get("schema_version", SCHEMA_VERSION))
            if version > SCHEMA_VERSION:
                raise BundleError(
                    f"{source}: schema_version {version} is newer than this uqserve "
                    f"understands ({SCHEMA_VERSION}); upgrade uqserve"
                )
            inp_spec = _input_spec(dict(d.get("input", {})), version)
            ood = dict(d.get("ood", {}))
            ood["validation_scores"] = tuple(float(v) for v in ood.get("validation_scores", ()))
            m = cls(
                name=str(d["name"]),
                au=str(d["au"]),
                eu=str(d["eu"]),
                num_members=int(d["num_members"]),
                num_samples=int(d["num_samples"]),
                classes=tuple(str(c) for c in d["classes"]),
                members=tuple(
                    Member(file=str(x["file"]), sha256=str(x["sha256"])) for x in d["members"]
                ),
                input=inp_spec,
                seed=int(d.get("seed", 0)),
                default_aggregator=str(d.get("default_aggregator", DEFAULT_AGGREGATOR)),
                ood=OODSpec(**ood),
                validation=dict(d.get("validation", {})),
                entanglement=dict(d.get("entanglement", {})),
                opset=int(d.get("opset", 18)),
                uqserve_version=str(d.get("uqserve_version", "")),
                schema_version=SCHEMA_VERSION,  # migrated on load
                manifest_version=int(d.get("manifest_version", 1)),
                created=str(d.get("created", "")),
                extra=dict(d.get("extra", {})),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{source}: malformed manifest ({exc!r}); re-export the bundle"
            ) from exc
        m.validate(source)
        return m

    def validate(self, source: str = "manifest") -> None:
        """Raise ``BundleError`` naming the first field that is inconsistent."""
        problems = [p for p in (name_problem(self.name),) if p]
        problems += [p for p in map(member_file_problem, (m.file for m in self.members)) if p]
        if self.au not in AU_METHODS:
            problems.append(f"au {self.au!r} is not one of {', '.join(AU_METHODS)}")
        if self.eu not in EU_METHODS:
            problems.append(f"eu {self.eu!r} is not one of {', '.join(EU_METHODS)}")
        digests = [m.sha256 for m in self.members]
        if len(set(digests)) != len(digests):
            problems.append(
                "members: two members are the same graph (equal sha256); copies give EU = 0 "
                "and the OOD flag never fires: re-export with distinct members"
            )
        if self.num_members < 1 or self.num_members != len(self.members):
            problems.append(f"num_members {self.num_members} but {len(self.members)} member files")
        if self.eu == "none" and self.num_members != 1:
            problems.append("eu 'none' needs exactly one member")
        if self.num_samples < 1:
            problems.append(f"num_samples {self.num_samples} < 1")
        if self.au == "softmax" and self.num_samples != 1:
            problems.append("au 'softmax' draws exactly one sample")
        if self.input.blend == "logits" and self.au != "softmax":
            problems.append("input.blend 'logits' needs softmax members (au 'softmax')")
        if len(self.classes) < 2:
            problems.append("need at least two classes (background first)")
        if self.default_aggregator not in AGGREGATORS:
            problems.append(f"default_aggregator {self.default_aggregator!r} unknown")
        if self.ood.aggregator not in AGGREGATORS:
            problems.append(f"ood.aggregator {self.ood.aggregator!r} unknown")
        problems.extend(self.ood.problems())
        problems.extend(self.input.problems())
        if problems:
            raise BundleError(f"{source}: " + "; ".join(problems))


def _input_spec(inp: dict[str, Any], version: int) -> InputSpec:
    """``manifest.input`` as an ``InputSpec``; version 1 manifests are migrated.

    Version 1 bundles were 2D models fed whole slices as stored: ``dims`` 2, no
    patch, and no target spacing or orientation (their ``spacing`` only recorded
    the training data's and was never applied, so it is dropped).
    """
    norm = dict(inp.pop("normalization", {}))
    if norm.get("clip") is not None:
        norm["clip"] = tuple(float(v) for v in norm["clip"])
    if version < 2:
        inp.pop("spacing", None)
    patch, spacing, orientation = inp.get("patch"), inp.get("spacing"), inp.get("orientation")
    pad = dict(inp.get("pad") or {})
    return InputSpec(
        channels=int(inp.get("channels", 1)),
        tile_size=_pair(inp.get("tile_size", (128, 128)), int),
        multiple=int(inp.get("multiple", 16)),
        dims=int(inp.get("dims", 2)),
        patch=None if patch is None else tuple(int(v) for v in patch),
        spacing=None if spacing is None else tuple(float(v) for v in spacing),
        orientation=None if orientation is None else str(orientation).upper(),
        interpolation=str(inp.get("interpolation", "cubic")),
        normalization=Normalization(**norm),
        crop_nonzero=bool(inp.get("crop_nonzero", False)),
        slice_axis=None if inp.get("slice_axis") is None else int(inp["slice_axis"]),
        pad=Padding(
            mode=str(pad.get("mode", "reflect")),
            value=float(pad.get("value", 0.0)),
            centre=bool(pad.get("centre", False)),
        ),
        blend=str(inp.get("blend", "probabilities")),
        gaussian=str(inp.get("gaussian", "centred")),
    )


def _pair(v: Any, typ: type) -> Any:
    vals = tuple(typ(x) for x in v)
    if len(vals) != 2:
        raise UsageError(f"expected two values, got {v!r}")
    return vals


@dataclass(frozen=True)
class Bundle:
    """A manifest plus the folder it lives in."""

    path: Path
    manifest: Manifest

    def member_path(self, index: int) -> Path:
        """Member ``index``'s file; refused when it (or a symlink) leaves the bundle folder."""
        file = self.manifest.members[index].file
        path = self.path / file
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise BundleError(
                f"{self.path / MANIFEST_NAME}: members[{index}].file {file!r} leads outside "
                "the bundle folder (a symlink?); member files must lie inside it: re-export "
                "the bundle"
            )
        return path

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.path / MANIFEST_NAME)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_bundles() -> list[str]:
    """Names of the bundles that ship inside the package."""
    if not BUNDLES_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / MANIFEST_NAME).is_file())


def resolve_bundle(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """Turn a shipped bundle's name or a folder into the bundle folder."""
    if name_or_path is None:
        name_or_path = DEFAULT_BUNDLE
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / MANIFEST_NAME).is_file():
            raise BundleError(
                f"{p}: not a bundle (no {MANIFEST_NAME}); pass a folder written by `uqserve export`"
            )
        return p
    if p.is_file():
        if p.name == MANIFEST_NAME:
            return p.parent
        raise BundleError(f"{p}: a bundle is a folder with {MANIFEST_NAME}, not a file")
    shipped = BUNDLES_DIR / str(name_or_path)
    if os.sep not in str(name_or_path) and (shipped / MANIFEST_NAME).is_file():
        return shipped
    known = ", ".join(shipped_bundles()) or "none installed"
    raise BundleError(f"{name_or_path}: no such bundle folder or shipped bundle (shipped: {known})")


def load_bundle(name_or_path: str | os.PathLike[str] | None = None, verify: bool = True) -> Bundle:
    """Load and validate a bundle; with ``verify`` check every member's sha256."""
    path = resolve_bundle(name_or_path)
    mpath = path / MANIFEST_NAME
    data = read_json_object(mpath, BundleError, "re-export the bundle")
    bundle = Bundle(path=path, manifest=Manifest.from_dict(data, source=str(mpath)))
    for i in range(bundle.manifest.num_members):
        bundle.member_path(i)  # refuses files outside the folder
    if verify:
        verify_checksums(bundle)
    return bundle


def verify_checksums(bundle: Bundle) -> None:
    """Raise ``BundleError`` on the first member file that is missing or altered."""
    for i, member in enumerate(bundle.manifest.members):
        f = bundle.member_path(i)
        if not f.is_file():
            raise BundleError(f"{f}: member {i} is missing; restore it or re-export the bundle")
        digest = sha256_file(f)
        if digest != member.sha256:
            raise BundleError(
                f"{f}: checksum mismatch (manifest {member.sha256[:12]}…, file {digest[:12]}…); "
                "the file was altered or corrupted: restore it or re-export the bundle"
            )


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename; mode per the umask)."""
    manifest.validate(str(folder))
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    return atomic_write_text(Path(folder) / MANIFEST_NAME, text)
