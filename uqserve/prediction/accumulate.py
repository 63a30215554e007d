"""Accumulation: member outputs, batch by batch -> running sums, class counts, labels.

Each member's mean and sample entropy are cropped to the real pixels and
streamed into an ``uncertainty.Accumulator`` slab by slab, so memory is
O(K x voxels) whatever the number of members M and samples S. The per-sample
class counts ``[M, S, K]`` (for the volume distribution) and, on request, the
per-sample labels are gathered alongside.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from uqserve import uncertainty
from uqserve._progress import ProgressFn
from uqserve.bundle import BundleError, Manifest
from uqserve.errors import UsageError
from uqserve.prediction.geometry import SlicePlan
from uqserve.runtime import MemberOutputs, ReducedOutputs, RuntimeServiceError
from uqserve.uncertainty import PreparedMember

__all__ = [
    "Accumulated", "Clock", "ProgressFn", "accumulate", "check_member_values", "check_outputs",
    "member_error", "member_preparer",
]  # fmt: skip

_Out = TypeVar("_Out", list[MemberOutputs], list[MemberOutputs] | ReducedOutputs)


@dataclass
class Accumulated:
    """The whole volume's outputs, in the working order ``[rows, cols, depth]``.

    dec            the decomposition; maps ``[rows, cols, depth]``, mean ``[K, rows, cols, depth]``
    counts         ``[M, S, K]`` float64, voxels per class in each coherent sample
    labels         ``[M, S, rows, cols, depth]`` uint8 with ``want_samples``, else None
    model_s, accumulate_s  seconds waiting for the runtime, and adding its outputs up
    """

    dec: uncertainty.Decomposition
    counts: npt.NDArray[np.float64]
    labels: npt.NDArray[np.uint8] | None
    model_s: float
    accumulate_s: float


def accumulate(
    results: Iterator[list[MemberOutputs] | ReducedOutputs],
    plan: SlicePlan,
    man: Manifest,
    *,
    want_samples: bool,
    progress: ProgressFn | None = None,
    source: str = "",
) -> Accumulated:
    """Consume the runtime's results: per batch of ``plan``, a list of M member outputs
    or their sums (``ReducedOutputs``, from a server that reduces)."""
    K, M, S = man.num_classes, man.num_members, man.num_samples
    rows, cols, depth = plan.rows, plan.cols, plan.depth
    # Slices first: each batch is then one contiguous slab of the running sums (a
    # [X, Y, Z] domain made every add a strided write, 1.5 s of a 256^2 x 64 scan).
    acc = uncertainty.Accumulator(K, (depth, rows, cols))
    prep = member_preparer(plan, man)  # where the runtime did not run it already
    counts = np.zeros((M, S, K), np.float64)
    labels = np.zeros((M, S, rows, cols, depth), np.uint8) if want_samples else None
    clock = Clock()
    z0 = 0
    for outs in clock.batches(results, man):
        t0 = time.perf_counter()
        b = min(plan.batch_size, depth - z0)
        if isinstance(outs, ReducedOutputs):
            _add_reduced(acc, counts, outs, (b, K, plan.pad_h, plan.pad_w), plan, man, z0)
            clock.accumulate_s += time.perf_counter() - t0
            z0 += b
            if progress is not None:
                progress(source, z0, depth)
            continue
        for m, out in enumerate(outs):
            check_outputs(out, (b, K, plan.pad_h, plan.pad_w), S, m)
            member = out.prepared if isinstance(out.prepared, PreparedMember) else prep(m, out)
            acc.add_prepared(member, where=(slice(z0, z0 + b),))
            counts[m] += out.sample_counts.sum(axis=0, dtype=np.float64)
            if labels is not None:
                if out.sample_labels is None:
                    raise RuntimeServiceError(f"runtime returned no sample_labels for member {m}")
                labels[m, :, :, :, z0 : z0 + b] = np.transpose(
                    out.sample_labels[:, :, :rows, :cols], (1, 2, 3, 0)
                )
        clock.accumulate_s += time.perf_counter() - t0
        z0 += b
        if progress is not None:
            progress(source, z0, depth)
    if z0 != depth:
        raise RuntimeServiceError(f"runtime returned {z0} of {depth} slices")
    t0 = time.perf_counter()
    dec = acc.result(release=True, axes=(1, 2, 0))  # [depth, rows, cols] -> [rows, cols, depth]
    return Accumulated(
        dec, counts, labels, clock.model_s, clock.accumulate_s + time.perf_counter() - t0
    )


def member_preparer(
    plan: SlicePlan, man: Manifest
) -> Callable[[int, MemberOutputs], uncertainty.PreparedMember]:
    """The runtime's ``prepare`` hook for :func:`accumulate`: one member's batch
    ``[b, K, pad_h, pad_w]``, checked, cropped to the real pixels and turned into
    its entropy and foreground (``uncertainty.prepare_member``)."""
    K, S, rows, cols = man.num_classes, man.num_samples, plan.rows, plan.cols

    def prepare(m: int, out: MemberOutputs) -> uncertainty.PreparedMember:
        b = out.mean.shape[0] if out.mean.ndim else 0
        check_outputs(out, (b, K, plan.pad_h, plan.pad_w), S, m)
        mean = np.swapaxes(out.mean[:, :, :rows, :cols], 0, 1)  # [K, b, X, Y]
        # S = 1: the sample entropy is H[p̄_m]; let the accumulator compute it so
        # that AU_latent is exactly 0 rather than float noise.
        ent = None if S == 1 else out.sample_entropy[:, :rows, :cols]  # [b, X, Y]
        try:
            return uncertainty.prepare_member(K, mean, ent)
        except UsageError as exc:
            raise member_error(man, m, exc) from None

    return prepare


def _add_reduced(
    acc: uncertainty.Accumulator,
    counts: npt.NDArray[np.float64],
    out: ReducedOutputs,
    expected: tuple[int, int, int, int],
    plan: SlicePlan,
    man: Manifest,
    z0: int,
) -> None:
    """Add one batch of server-side sums (all M members at once) to ``acc`` and ``counts``."""
    b, K, h, w = expected
    M, S = man.num_members, man.num_samples
    shapes = (out.mean_sum.shape, out.entropy_sum.shape, out.sample_entropy_sum.shape,
              out.foreground.shape, out.sample_counts.shape)  # fmt: skip
    if shapes != (expected, (b, h, w), (b, h, w), (b, h, w), (b, M, S, K)):
        raise RuntimeServiceError(
            f"the server's reduction returned shapes {shapes}; expected {expected}, "
            f"{(b, h, w)} (x3), {(b, M, S, K)}: the repository does not match the bundle; "
            "regenerate it with `uqserve repo --reduce server`"
        )
    rows, cols = plan.rows, plan.cols
    try:
        _add_sums(acc, out, rows, cols, S, M, z0, b)
    except UsageError as exc:
        raise member_error(man, None, exc) from None
    counts += out.sample_counts.sum(axis=0, dtype=np.float64)


def _add_sums(
    acc: uncertainty.Accumulator, out: ReducedOutputs, rows: int, cols: int, S: int, M: int,
    z0: int, b: int,
) -> None:  # fmt: skip
    acc.add_sums(
        np.swapaxes(out.mean_sum[:, :, :rows, :cols], 0, 1),  # [K, b, X, Y]
        out.entropy_sum[:, :rows, :cols],
        # S = 1: the sample entropy is H[p̄_m] (AU_latent exactly 0), as for members.
        None if S == 1 else out.sample_entropy_sum[:, :rows, :cols],
        out.foreground[:, :rows, :cols],
        M,
        where=(slice(z0, z0 + b),),
    )


class Clock:
    """Seconds spent waiting for the runtime and adding its outputs up."""

    def __init__(self) -> None:
        self.model_s = 0.0
        self.accumulate_s = 0.0

    def batches(self, results: Iterator[_Out], man: Manifest) -> Iterator[_Out]:
        """``results`` with the wait for each timed and a member list's length checked."""
        while True:
            t0 = time.perf_counter()
            try:
                outs = next(results)
            except StopIteration:
                return
            self.model_s += time.perf_counter() - t0
            if isinstance(outs, list) and len(outs) != man.num_members:
                raise RuntimeServiceError(
                    f"runtime returned {len(outs)} members, bundle {man.name} has {man.num_members}"
                )
            yield outs


def member_error(man: Manifest, m: int | None, exc: UsageError) -> BundleError:
    """A member's outputs that are no probabilities: the bundle's fault, never the scan's.

    ``exc`` is the check's complaint (NaN, negative, not summing to 1); ``m``
    None: the members' sums from a server that reduces.
    """
    text = str(exc)
    field = "sample_entropy" if "sample_entropy" in text else "mean"
    reason = text.split(": ", 1)[-1].split("; ")[0]
    who = "the members" if m is None else f"member {m} ({man.members[m].file})"
    return BundleError(
        f"bundle {man.name}: {who} output {field} {reason}; the member graph is broken or "
        "was altered (not a problem of the scan): restore or re-export the bundle"
    )


def check_member_values(out: MemberOutputs, man: Manifest, m: int) -> None:
    """Member ``m``'s ``mean [b, K, ...]`` is probabilities and its sample entropy finite."""
    try:
        uncertainty.check_probabilities(out.mean, 1, "mean")
        uncertainty.finite_array(out.sample_entropy, "sample_entropy")
    except UsageError as exc:
        raise member_error(man, m, exc) from None


def check_outputs(out: MemberOutputs, expected: tuple[int, ...], S: int, m: int) -> None:
    """``expected``: the mean's shape ``(b, K, *spatial)`` (``[h, w]`` or ``[d, h, w]``)."""
    b, K, *sp = expected
    mean, ent, cnt = out.mean, out.sample_entropy, out.sample_counts
    if mean.shape != expected or ent.shape != (b, *sp) or cnt.shape != (b, S, K):
        raise RuntimeServiceError(
            f"member {m} returned mean {mean.shape}, sample_entropy {ent.shape}, "
            f"sample_counts {cnt.shape}; expected {expected}, {(b, *sp)}, {(b, S, K)}: "
            "the graph does not match its manifest; re-export the bundle"
        )
