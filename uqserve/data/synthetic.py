"""Synthetic ambiguous segmentation data: 2D slices and coherent 3D volumes.

A scene is a body-like ellipse on a dark background with smooth texture,
one or two large, low-contrast "organs" and a few lesions: blobs of varied
size and contrast, some of them faint. Every lesion has a *soft map*
``s(x) = sigmoid((1 - r(x)) / w)``, with ``r`` its (slightly irregular)
normalised radius; the image shows the lesion as ``contrast * s`` so its edge
is genuinely blurred. ``A`` annotators each draw the lesions where ``s``
exceeds their own threshold, and some annotators miss faint lesions:

* ``ambiguity="low"``: thresholds within 0.5 ± 0.1, a faint lesion is missed
  by an annotator with probability 0.15;
* ``ambiguity="high"``: thresholds within 0.5 ± 0.3, faint lesions missed with
  probability 0.5, other lesions with probability 0.05.

Annotator ``a`` keeps a consistent style across images (annotator 0 is the
tightest, annotator ``A - 1`` the most generous), plus a little jitter per
image, as real raters do. ``truth`` thresholds every lesion at 0.5.

With ``num_classes=3`` each lesion is one of two types: type 1 is brighter
than its surroundings, type 2 darker, so the class is visible in the image.

Shapes are generated in units of the in-plane field of view, so a 64x64 and
a 128x128 slice show the same anatomy at different resolutions. Volumes are
generated in millimetres (anisotropic spacing, through-plane axis last) and
their lesions are ellipsoids that stay coherent across slices.

Everything is a deterministic function of the seed (numpy ``Generator``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.data._fields import grid, sigmoid, smooth_field
from uqserve.errors import UsageError
from uqserve.volumes.base import Volume

AMBIGUITIES = ("low", "high")

# (threshold spread, P(miss) for faint lesions, P(miss) for other lesions)
_AMBIGUITY = {"low": (0.1, 0.15, 0.0), "high": (0.3, 0.5, 0.05)}
_EDGE_WIDTH = 0.15  # sigmoid width in units of the lesion radius
_FAINT_PROB = 0.35


@dataclass(frozen=True)
class SyntheticImage:
    """One 2D slice.

    image        ``[C, H, W]`` float32, intensities roughly in [0, 1] (C = 1)
    annotations  ``[A, H, W]`` uint8 label maps, one per annotator
    truth        ``[H, W]`` uint8, every lesion thresholded at 0.5
    soft         ``[H, W]`` float32, the soft lesion map (max over lesions)
    """

    image: npt.NDArray[np.float32]
    annotations: npt.NDArray[np.uint8]
    truth: npt.NDArray[np.uint8]
    soft: npt.NDArray[np.float32]


@dataclass(frozen=True)
class SyntheticSet:
    """A stack of slices; item ``i`` equals ``make_slice(seeds[i], ...)``.

    images       ``[N, C, H, W]`` float32
    annotations  ``[N, A, H, W]`` uint8
    truth        ``[N, H, W]`` uint8
    seeds        ``[N]`` uint64, the per-image seeds
    """

    images: npt.NDArray[np.float32]
    annotations: npt.NDArray[np.uint8]
    truth: npt.NDArray[np.uint8]
    seeds: npt.NDArray[np.uint64]
    num_classes: int = 2

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class SyntheticVolume:
    """One 3D scan.

    volume       ``Volume`` with data ``[X, Y, Z]`` float32 and an anisotropic RAS+ affine
    annotations  ``[A, X, Y, Z]`` uint8
    truth        ``[X, Y, Z]`` uint8
    """

    volume: Volume
    annotations: npt.NDArray[np.uint8]
    truth: npt.NDArray[np.uint8]


def _check(ambiguity: str, num_classes: int, num_annotators: int) -> None:
    if ambiguity not in _AMBIGUITY:
        raise UsageError(f"ambiguity {ambiguity!r} is not one of {', '.join(AMBIGUITIES)}")
    if num_classes not in (2, 3):
        raise UsageError(
            f"num_classes must be 2 (background, lesion) or 3 (two lesion types), got {num_classes}"
        )
    if num_annotators < 1:
        raise UsageError(f"num_annotators must be >= 1, got {num_annotators}")


@dataclass(frozen=True)
class _Space:
    """The scene's coordinates and the shape helpers every part of it draws with.

    Coordinates are in units of the in-plane field of view; the first two axes
    are in-plane, a third (volumes) is through-plane.
    """

    rng: np.random.Generator
    shape: tuple[int, ...]
    coords: tuple[npt.NDArray[np.float64], ...]
    vox: tuple[float, ...]  # voxels per field of view, per axis

    @classmethod
    def of(
        cls, rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...]
    ) -> _Space:
        fov = max(shape[0] * spacing[0], shape[1] * spacing[1])
        return cls(rng, shape, tuple(grid(shape, spacing, fov)), tuple(fov / s for s in spacing))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def field(self, sigma_fov: float) -> npt.NDArray[np.float32]:
        """A smooth random field with correlation length ``sigma_fov`` (field of view units)."""
        return smooth_field(self.rng, self.shape, [sigma_fov * v for v in self.vox])

    def radius(
        self, c: Sequence[float], r: Sequence[float], angle: float
    ) -> npt.NDArray[np.float64]:
        """Ellipsoidal radius around centre ``c`` with semi-axes ``r``, turned in-plane."""
        dx = [self.coords[i] - c[i] for i in range(self.ndim)]
        ca, sa = np.cos(angle), np.sin(angle)
        d = (ca * dx[0] + sa * dx[1], -sa * dx[0] + ca * dx[1], *dx[2:])
        return np.sqrt(sum((di / ri) ** 2 for di, ri in zip(d, r, strict=True)))


@dataclass(frozen=True)
class _Body:
    radii: list[float]
    angle: float
    centre: list[float]
    mask: npt.NDArray[np.floating[Any]]  # soft body mask in [0, 1]


@dataclass(frozen=True)
class _Lesions:
    soft: npt.NDArray[np.floating[Any]]  # [L, *shape] soft lesion maps
    classes: list[int]
    faint: list[bool]


def _scene(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    ambiguity: str,
    num_classes: int,
    num_annotators: int,
) -> tuple[
    npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.float32]
]:
    """Generate image, annotations ``[A, *shape]``, truth and soft map.

    The first two axes are in-plane; a third axis (volumes) is through-plane.
    Coordinates are in units of the in-plane field of view. The steps draw from
    ``rng`` in a fixed order (body, organs, lesions, noise, annotators): the
    same seed gives the same scene.
    """
    space = _Space.of(rng, shape, spacing)
    body = _body(space)
    image = 0.03 + body.mask * (
        rng.uniform(0.30, 0.40) + 0.045 * space.field(0.15) + 0.025 * space.field(0.04)
    )
    image = _add_organs(space, image, body)
    image, lesions = _add_lesions(space, image, body, num_classes)
    image = image + 0.012 * rng.standard_normal(shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    annotations, truth = _annotate(rng, lesions, ambiguity, num_annotators)
    return image, annotations, truth, lesions.soft.max(axis=0).astype(np.float32)


def _body(space: _Space) -> _Body:
    """A soft-edged ellipse (an elliptic cylinder whose size varies slowly along z)."""
    rng, ndim = space.rng, space.ndim
    radii = [rng.uniform(0.36, 0.45), rng.uniform(0.28, 0.40)]
    if ndim == 3:
        radii.append(10.0)  # effectively unbounded through-plane
    angle = rng.uniform(-0.4, 0.4)
    centre = [rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)] + [0.0] * (ndim - 2)
    r_body = space.radius(centre, radii, angle)
    if ndim == 3:
        r_body = r_body * (1.0 + 0.3 * space.coords[2] ** 2)
    return _Body(radii, angle, centre, sigmoid((1.0 - r_body) / 0.015))


def _add_organs(space: _Space, image: npt.NDArray[Any], body: _Body) -> npt.NDArray[Any]:
    """Large low-contrast organs: structure that is not a lesion."""
    rng, ndim = space.rng, space.ndim
    for _ in range(int(rng.integers(1, 3))):
        c = [rng.uniform(-0.15, 0.15), rng.uniform(-0.12, 0.12)] + [
            rng.uniform(-0.1, 0.1) for _ in range(ndim - 2)
        ]
        r = [rng.uniform(0.12, 0.20), rng.uniform(0.10, 0.16)] + [0.3] * (ndim - 2)
        organ = sigmoid((1.0 - space.radius(c, r, rng.uniform(0, np.pi))) / 0.1)
        image = image + body.mask * organ * rng.choice([-1.0, 1.0]) * rng.uniform(0.02, 0.045)
    return image


def _add_lesions(
    space: _Space, image: npt.NDArray[Any], body: _Body, num_classes: int
) -> tuple[npt.NDArray[Any], _Lesions]:
    """Lesions: ellipsoids (spheroids in 3D, in millimetres) inside the body."""
    rng, ndim = space.rng, space.ndim
    n_lesions = int(rng.integers(1, 5) if ndim == 2 else rng.integers(3, 9))
    boundary = space.field(0.03)  # irregular lesion outlines
    z_half = float(np.max(np.abs(space.coords[2]))) if ndim == 3 else 0.0
    soft_maps, classes, faint = [], [], []
    for _ in range(n_lesions):
        # Sample the centre inside the inner part of the body.
        rho, phi = np.sqrt(rng.uniform(0, 1)) * 0.7, rng.uniform(0, 2 * np.pi)
        local = np.array([rho * np.cos(phi) * body.radii[0], rho * np.sin(phi) * body.radii[1]])
        ca, sa = np.cos(body.angle), np.sin(body.angle)
        c = [
            body.centre[0] + ca * local[0] - sa * local[1],
            body.centre[1] + sa * local[0] + ca * local[1],
        ]
        size = float(np.exp(rng.uniform(np.log(0.035), np.log(0.11))))
        aspect = rng.uniform(0.7, 1.3)
        r = [size * aspect, size / aspect]
        if ndim == 3:
            c.append(rng.uniform(-0.7, 0.7) * z_half)
            r.append(size * rng.uniform(0.8, 1.2))
        r_les = space.radius(c, r, rng.uniform(0, np.pi)) * (1.0 + 0.12 * boundary)
        soft_maps.append(sigmoid((1.0 - r_les) / _EDGE_WIDTH))
        is_faint = bool(rng.uniform() < _FAINT_PROB)
        faint.append(is_faint)
        cls = 1 if num_classes == 2 else int(rng.integers(1, 3))
        classes.append(cls)
        contrast = rng.uniform(0.09, 0.14) if is_faint else rng.uniform(0.18, 0.40)
        sign = 1.0 if cls == 1 else -1.0
        image = image + sign * contrast * soft_maps[-1] * (1.0 + 0.08 * boundary)
    return image, _Lesions(np.stack(soft_maps), classes, faint)


def _annotate(
    rng: np.random.Generator, lesions: _Lesions, ambiguity: str, num_annotators: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Annotations ``[A, *shape]`` (each annotator's threshold and misses) and the truth."""
    spread, miss_faint, miss_other = _AMBIGUITY[ambiguity]
    soft = lesions.soft  # [L, *shape]
    n_lesions, ndim = soft.shape[0], soft.ndim - 1
    cls_of = np.array([0, *lesions.classes], dtype=np.uint8)
    # Annotator styles: fixed offset per annotator plus per-image jitter.
    offsets = np.linspace(-1.0, 1.0, num_annotators) if num_annotators > 1 else np.zeros(1)
    thresholds = 0.5 - spread * offsets + rng.normal(0.0, spread / 6.0, num_annotators)
    thresholds = np.clip(thresholds, 0.05, 0.95)
    p_miss = np.where(np.array(lesions.faint), miss_faint, miss_other)
    missed = rng.uniform(size=(num_annotators, n_lesions)) < p_miss[None, :]

    def label(threshold: float, keep: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
        marked = (soft >= threshold) & keep.reshape((-1,) + (1,) * ndim)
        score = np.where(marked, soft, -1.0)
        best = np.argmax(score, axis=0)
        any_marked = marked.any(axis=0)
        return np.where(any_marked, cls_of[best + 1], 0).astype(np.uint8)

    annotations = np.stack([label(float(thresholds[a]), ~missed[a]) for a in range(num_annotators)])
    truth = label(0.5, np.ones(n_lesions, dtype=bool))
    return annotations, truth


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 8:
        raise UsageError(f"size must be (H, W) with both >= 8, got {size}")
    return size[0], size[1]


def make_slice(
    seed: int,
    size: int | Sequence[int] = (128, 128),
    ambiguity: str = "low",
    num_classes: int = 2,
    num_annotators: int = 4,
) -> SyntheticImage:
    """One synthetic 2D slice with ``num_annotators`` annotations.

    Returns ``SyntheticImage(image [1, H, W], annotations [A, H, W], truth [H, W], soft [H, W])``.
    """
    _check(ambiguity, num_classes, num_annotators)
    h, w = _size2(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
    image, ann, truth, soft = _scene(
        rng, (h, w), (1.0, 1.0), ambiguity, num_classes, num_annotators
    )
    return SyntheticImage(image=image[None], annotations=ann, truth=truth, soft=soft)


def dataset_seeds(n: int, seed: int) -> npt.NDArray[np.uint64]:
    """The per-image seeds of ``make_dataset(n, seed)`` (a prefix-stable sequence)."""
    return np.array(
        [np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint64)[0] for i in range(n)],
        dtype=np.uint64,
    )


def make_dataset(
    n: int,
    seed: int,
    size: int | Sequence[int] = (128, 128),
    ambiguity: str = "low",
    num_classes: int = 2,
    num_annotators: int = 4,
) -> SyntheticSet:
    """``n`` independent slices; ``make_dataset(n, s)`` is a prefix of ``make_dataset(n + 1, s)``.

    Returns ``SyntheticSet(images [N, 1, H, W], annotations [N, A, H, W], truth [N, H, W])``.
    """
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    _check(ambiguity, num_classes, num_annotators)
    seeds = dataset_seeds(n, seed)
    items = [make_slice(int(s), size, ambiguity, num_classes, num_annotators) for s in seeds]
    return SyntheticSet(
        images=np.stack([it.image for it in items]),
        annotations=np.stack([it.annotations for it in items]),
        truth=np.stack([it.truth for it in items]),
        seeds=seeds,
        num_classes=num_classes,
    )


def synthetic_affine(
    shape: Sequence[int],
    spacing: Sequence[float],
    origin_shift: Sequence[float] = (7.5, -12.0, 31.0),
) -> npt.NDArray[np.float64]:
    """RAS+ affine with the given spacing, centred near (but not at) the origin."""
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    affine[:3, 3] = [
        -(n - 1) * s / 2.0 + o for n, s, o in zip(shape, spacing, origin_shift, strict=True)
    ]
    return affine


def make_volume(
    seed: int,
    shape: Sequence[int] = (128, 128, 32),
    spacing: Sequence[float] = (0.8, 0.8, 3.0),
    ambiguity: str = "low",
    num_classes: int = 2,
    num_annotators: int = 4,
) -> SyntheticVolume:
    """A coherent synthetic 3D scan: ``[X, Y, Z]`` with the through-plane axis last.

    Lesions are ellipsoids in millimetres, so they span several slices; the
    affine is RAS+ with the given (anisotropic) spacing and a non-zero origin.
    Each axial slice looks like a ``make_slice`` image of the same in-plane size.
    """
    _check(ambiguity, num_classes, num_annotators)
    shape3 = tuple(int(s) for s in shape)
    spacing3 = tuple(float(s) for s in spacing)
    if len(shape3) != 3 or min(shape3[:2]) < 8 or shape3[2] < 1:
        raise UsageError(f"shape must be (X, Y, Z) with X, Y >= 8 and Z >= 1, got {shape3}")
    if len(spacing3) != 3 or min(spacing3) <= 0:
        raise UsageError(f"spacing must be three positive millimetre values, got {spacing3}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3]))
    image, ann, truth, _ = _scene(rng, shape3, spacing3, ambiguity, num_classes, num_annotators)
    volume = Volume(
        data=image,
        affine=synthetic_affine(shape3, spacing3),
        source=f"synthetic(seed={int(seed)})",
        slice_axis=2,
        meta={"ambiguity": ambiguity, "num_classes": num_classes},
    )
    return SyntheticVolume(volume=volume, annotations=ann, truth=truth)
