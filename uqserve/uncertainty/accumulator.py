"""Streaming decomposition: members' slabs added into running sums (``Accumulator``)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.uncertainty.checks import (
    SUM_TOLERANCE,
    BoolArray,
    FloatArray,
    check_probabilities,
    finite_array,
)
from uqserve.uncertainty.decompose import (
    Decomposition,
    _entropy_into,
    _finish,
    _foreground_of,
    _scaled_moved,
)


@dataclass(frozen=True, eq=False)
class PreparedMember:
    """One member's slab, checked, with what :meth:`Accumulator.add` derives from it.

    mean            ``[K, *sub]`` float32 p̄_m
    entropy         ``[*sub]`` H[p̄_m] (nats)
    sample_entropy  ``[*sub]`` the mean per-sample entropy (``entropy`` for S = 1)
    foreground      ``[*sub]`` bool, the member's argmax is a class >= 1
    """

    mean: FloatArray
    entropy: FloatArray
    sample_entropy: FloatArray
    foreground: BoolArray


def prepare_member(
    num_classes: int,
    member_mean: npt.ArrayLike,
    member_sample_entropy: npt.ArrayLike | None = None,
) -> PreparedMember:
    """:meth:`Accumulator.add`'s checks and per-member maps, without the running sums.

    Safe to call from other threads: a runtime's ``prepare`` hook runs it where
    the member's outputs were made, while they are in cache, and
    :meth:`Accumulator.add_prepared` then adds the result.
    """
    pm = np.asarray(member_mean)
    if pm.dtype.kind in "fiu":
        # One contiguous float32 copy (at most [K, *slab]) when the caller passes a
        # strided view (e.g. a transposed batch): every pass below is then faster.
        pm = np.ascontiguousarray(pm, dtype=np.float32)
    pm, pmin = check_probabilities(pm, 0, "Accumulator.add(member_mean)")
    h = _entropy_into(np.empty(pm.shape[1:], np.float32), pm, pmin > 0)
    if member_sample_entropy is None:
        return PreparedMember(pm, h, h, _foreground_of(pm))
    hs = finite_array(member_sample_entropy, "Accumulator.add(member_sample_entropy)")
    if hs.shape != h.shape:
        raise UsageError(
            f"Accumulator.add: member_sample_entropy has shape {hs.shape}, expected {h.shape}"
        )
    # By concavity 0 <= mean_s H[p_s] <= H[mean_s p_s]; allow float32 rounding.
    tol = SUM_TOLERANCE * (1 + math.log(num_classes))
    if float(hs.min()) < -tol or bool(np.greater(hs, h + tol).any()):
        raise UsageError(
            "Accumulator.add: member_sample_entropy must lie in [0, H[member_mean]] "
            "(the mean entropy of the member's samples); got values outside"
        )
    return PreparedMember(pm, h, hs, _foreground_of(pm))


class Accumulator:
    """Streaming decomposition: add members' p̄_m slab by slab, memory O(K x voxels).

    Keeps float32 running sums of ``p̄_m``, ``H[p̄_m]`` and the members'
    mean per-sample entropy, a per-voxel member count, and whether any member's
    argmax was foreground. Updates are in place; no buffer grows with M or S.
    :meth:`result` equals :func:`decompose` on the same data (to float32
    tolerance) whatever the order of members and slabs.

    Args:
        num_classes: K >= 2.
        spatial_shape: the whole domain, e.g. ``(X, Y, Z)``.

    Example:
        >>> import numpy as np
        >>> acc = Accumulator(2, (4, 6))
        >>> for p1 in (0.9, 0.1):  # two members, each sent as two slabs
        ...     mean = np.stack([np.full((4, 6), 1 - p1), np.full((4, 6), p1)])
        ...     acc.add(mean[:, :, :3], where=(slice(None), slice(0, 3)))
        ...     acc.add(mean[:, :, 3:], where=(slice(None), slice(3, 6)))
        >>> r = acc.result()
        >>> r.num_members, r.tu.shape, round(float(r.tu[0, 0]), 4)
        (2, (4, 6), 0.6931)
    """

    def __init__(self, num_classes: int, spatial_shape: tuple[int, ...]) -> None:
        if int(num_classes) != num_classes or num_classes < 2:
            raise UsageError(f"Accumulator: num_classes must be an integer >= 2, got {num_classes}")
        shape = tuple(int(s) for s in spatial_shape)
        if not shape or any(s < 1 for s in shape):
            raise UsageError(
                f"Accumulator: spatial_shape must be positive sizes, got {spatial_shape}"
            )
        self.num_classes = int(num_classes)
        self.spatial_shape = shape
        self._sum_mean = np.zeros((self.num_classes, *shape), np.float32)
        self._sum_h = np.zeros(shape, np.float32)
        self._sum_hs = np.zeros(shape, np.float32)
        self._count = np.zeros(shape, np.uint16)
        self._foreground = np.zeros(shape, bool)
        self._adds = 0
        self._released = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the running sums."""
        arrays = (self._sum_mean, self._sum_h, self._sum_hs, self._count, self._foreground)
        return sum(a.nbytes for a in arrays)

    def _region(self, where: tuple[slice, ...] | None) -> tuple[tuple[slice, ...], tuple[int, ...]]:
        nd = len(self.spatial_shape)
        if where is None:
            where = ()
        if not isinstance(where, tuple) or not all(isinstance(s, slice) for s in where):
            raise UsageError(
                "Accumulator.add: where must be a tuple of slices over the spatial axes, "
                f"got {where!r}"
            )
        if len(where) > nd:
            raise UsageError(
                f"Accumulator.add: where has {len(where)} slices but the domain has {nd} axes"
            )
        full = where + (slice(None),) * (nd - len(where))
        shape = tuple(
            len(range(*s.indices(n))) for s, n in zip(full, self.spatial_shape, strict=True)
        )
        if 0 in shape:
            raise UsageError(
                f"Accumulator.add: where={where!r} selects no voxels of {self.spatial_shape}"
            )
        return full, shape

    def add(
        self,
        member_mean: npt.ArrayLike,
        member_sample_entropy: npt.ArrayLike | None = None,
        where: tuple[slice, ...] | None = None,
    ) -> None:
        """Add one member's outputs for one slab of the domain.

        Args:
            member_mean: ``[K, *sub]`` p̄_m, the member's mean over its S samples.
            member_sample_entropy: ``[*sub]`` the member's mean per-sample
                entropy (1/S) Σ_s H[p_{m,s}] in nats; None for softmax members
                (S = 1), where it equals H[p̄_m].
            where: the slab of the spatial domain, one slice per spatial axis
                (missing trailing axes are whole); None for the whole domain.
                Each member must cover every voxel exactly once.

        Raises:
            ValueError: shapes do not fit, or the inputs are not probabilities /
                entropies of them.
        """
        self._check_usable("add")
        self._region(where)  # a bad slab is reported before the member is checked
        self.add_prepared(self.prepare(member_mean, member_sample_entropy), where)

    def prepare(
        self, member_mean: npt.ArrayLike, member_sample_entropy: npt.ArrayLike | None = None
    ) -> PreparedMember:
        """:func:`prepare_member` for this accumulator's K."""
        return prepare_member(self.num_classes, member_mean, member_sample_entropy)

    def add_prepared(self, member: PreparedMember, where: tuple[slice, ...] | None = None) -> None:
        """Add a member made by :meth:`prepare` for the slab ``where`` (as :meth:`add`)."""
        self._check_usable("add")
        full, shape = self._region(where)
        if member.mean.shape != (self.num_classes, *shape):
            raise UsageError(
                f"Accumulator.add: member_mean has shape {member.mean.shape}, expected "
                f"{(self.num_classes, *shape)} ([K, *slab]) for where={where!r}"
            )
        self._check_room(full, 1, "add")
        sub = (slice(None), *full)
        np.add(self._sum_mean[sub], member.mean, out=self._sum_mean[sub])
        np.add(self._sum_h[full], member.entropy, out=self._sum_h[full])
        np.add(self._sum_hs[full], member.sample_entropy, out=self._sum_hs[full], casting="unsafe")
        np.add(self._count[full], 1, out=self._count[full])
        np.logical_or(self._foreground[full], member.foreground, out=self._foreground[full])
        self._adds += 1

    def add_sums(
        self,
        mean_sum: npt.ArrayLike,
        entropy_sum: npt.ArrayLike,
        sample_entropy_sum: npt.ArrayLike | None,
        foreground: npt.ArrayLike,
        members: int,
        where: tuple[slice, ...] | None = None,
    ) -> None:
        """Add ``members`` members at once, summed elsewhere (a Triton reduction step).

        Args:
            mean_sum: ``[K, *sub]`` Σ_m p̄_m over the members.
            entropy_sum: ``[*sub]`` Σ_m H[p̄_m] (nats).
            sample_entropy_sum: ``[*sub]`` Σ_m of the members' mean per-sample
                entropies; None for softmax members (S = 1): then it is
                ``entropy_sum`` exactly, as :meth:`add` does.
            foreground: ``[*sub]`` bool, some member's argmax is a class >= 1.
            members: how many members the sums hold (>= 1).
            where: the slab, as in :meth:`add`.

        Raises:
            ValueError: shapes do not fit, or the sums cannot come from
                ``members`` probability vectors and their entropies.
        """
        self._check_usable("add_sums")
        if isinstance(members, bool) or int(members) != members or members < 1:
            raise UsageError(f"Accumulator.add_sums: members must be >= 1, got {members!r}")
        full, shape = self._region(where)
        pm = np.ascontiguousarray(np.asarray(mean_sum), dtype=np.float32)
        if pm.shape != (self.num_classes, *shape):
            raise UsageError(
                f"Accumulator.add_sums: mean_sum has shape {pm.shape}, expected "
                f"{(self.num_classes, *shape)} ([K, *slab]) for where={where!r}"
            )
        check_probabilities(pm / np.float32(members), 0, "Accumulator.add_sums(mean_sum / members)")
        tol = members * SUM_TOLERANCE * (1 + math.log(self.num_classes))
        h = finite_array(entropy_sum, "Accumulator.add_sums(entropy_sum)")
        hs = h if sample_entropy_sum is None else finite_array(
            sample_entropy_sum, "Accumulator.add_sums(sample_entropy_sum)"
        )  # fmt: skip
        fg = np.asarray(foreground, dtype=bool)
        for name, arr in (("entropy_sum", h), ("sample_entropy_sum", hs), ("foreground", fg)):
            if arr.shape != shape:
                raise UsageError(
                    f"Accumulator.add_sums: {name} has shape {arr.shape}, expected {shape}"
                )
        h_max = members * math.log(self.num_classes) + tol
        if float(h.min()) < -tol or float(h.max()) > h_max:
            raise UsageError(
                f"Accumulator.add_sums: entropy_sum must lie in [0, members x ln K = {h_max:.4g}]"
            )
        if hs is not h and (float(hs.min()) < -tol or bool(np.greater(hs, h + tol).any())):
            raise UsageError(
                "Accumulator.add_sums: sample_entropy_sum must lie in [0, entropy_sum]"
            )
        self._check_room(full, int(members), "add_sums")
        sub = (slice(None), *full)
        np.add(self._sum_mean[sub], pm, out=self._sum_mean[sub])
        np.add(self._sum_h[full], h, out=self._sum_h[full], casting="unsafe")
        np.add(self._sum_hs[full], hs, out=self._sum_hs[full], casting="unsafe")
        np.add(self._count[full], int(members), out=self._count[full], casting="unsafe")
        np.logical_or(self._foreground[full], fg, out=self._foreground[full])
        self._adds += int(members)

    def _check_room(self, full: tuple[slice, ...], n: int, what: str) -> None:
        """uint16 member counts: only after 65535 members can a voxel's count overflow."""
        limit = int(np.iinfo(self._count.dtype).max)
        if self._adds + n > limit and int(self._count[full].max()) + n > limit:
            raise UsageError(f"Accumulator.{what}: more than {limit} members per voxel")

    def result(
        self, *, release: bool = False, axes: tuple[int, ...] | None = None
    ) -> Decomposition:
        """The decomposition of everything added so far.

        Args:
            release: hand the running sums over to the result instead of
                keeping them: peak memory drops by about the size of the maps,
                and the accumulator cannot be used again.
            axes: the order of the spatial axes in the returned maps (a
                permutation, as for ``np.transpose``); they come out
                C-contiguous in that order. The sums are divided and moved in
                one pass before TU, EU and AU_latent are derived from them:
                cheaper than moving all seven maps afterwards, same values.

        Raises:
            ValueError: nothing was added, voxels saw different numbers of
                members (a slab is missing or was sent twice), or ``axes`` is
                not a permutation of the spatial axes.
        """
        self._check_usable("result")
        if self._adds == 0:
            raise UsageError("Accumulator.result: no member outputs were added")
        nd = len(self.spatial_shape)
        order = tuple(range(nd)) if axes is None else tuple(axes)
        if sorted(order) != list(range(nd)):
            raise UsageError(
                f"Accumulator.result: axes must be a permutation of 0..{nd - 1}, got {axes!r}"
            )
        lo, hi = int(self._count.min()), int(self._count.max())
        if lo != hi:
            raise UsageError(
                f"Accumulator.result: voxels saw between {lo} and {hi} members; every member "
                "must cover the whole domain exactly once (a slab is missing or duplicated)"
            )
        inv = np.float32(1.0 / hi)
        sums = ((self._sum_mean, (0, *(1 + a for a in order))),
                (self._sum_h, order), (self._sum_hs, order))  # fmt: skip
        if order == tuple(range(nd)) and release:
            for a, _ in sums:  # divided in place: no copy at all
                np.multiply(a, inv, out=a)
            mean, h, hs = (a for a, _ in sums)
        else:
            with ThreadPoolExecutor(3, thread_name_prefix="uqserve-result") as pool:
                mean, h, hs = pool.map(lambda item: _scaled_moved(item[0], item[1], inv), sums)
        foreground = np.ascontiguousarray(self._foreground.transpose(order))
        if release:
            empty = np.empty(0, np.float32)
            self._sum_mean = self._sum_h = self._sum_hs = empty
            self._count = np.empty(0, np.uint16)
            self._foreground = np.empty(0, bool)
            self._released = True
        elif foreground is self._foreground:
            foreground = foreground.copy()
        return _finish(mean, h, hs, foreground, hi)

    def _check_usable(self, what: str) -> None:
        if self._released:
            raise UsageError(
                f"Accumulator.{what}: result(release=True) handed the buffers over; "
                "start a new Accumulator"
            )
