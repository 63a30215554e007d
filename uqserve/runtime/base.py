"""The runtime interface: one batch of slices in, every member's outputs out.

Two implementations share it (``embedded``: onnxruntime in-process; ``triton``:
tritonclient gRPC). Everything above this layer cannot tell which one ran.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Bundle
from uqserve.contracts import MEMBER_INPUTS
from uqserve.errors import ServiceError


class RuntimeServiceError(ServiceError):
    """A runtime that cannot serve: unreachable server, model not ready, mismatch,
    or outputs that do not match the manifest."""


@dataclass(frozen=True)
class Batch:
    """A batch of B slices (or tiles) ready for the member graphs.

    image  ``[B, C, H, W]`` float32, normalised
    seed   ``[B]`` int64, the run seed (same for every slice of a volume)
    offset ``[B, 3]`` int64, ``(z, y0, x0)`` global position of each tile
    valid  ``[B, 2]`` int64, ``(rows, cols)`` of unpadded pixels in each tile
    """

    image: npt.NDArray[np.float32]
    seed: npt.NDArray[np.int64]
    offset: npt.NDArray[np.int64]
    valid: npt.NDArray[np.int64]

    def feeds(self) -> dict[str, npt.NDArray[np.generic]]:
        """The member graphs' inputs by name (``uqserve.contracts.MEMBER_INPUTS``, in order)."""
        return {name: getattr(self, name) for name in MEMBER_INPUTS}


@dataclass(frozen=True)
class MemberOutputs:
    """One member's outputs for one batch.

    mean           ``[B, K, H, W]`` float32, p̄_m
    sample_entropy ``[B, H, W]`` float32, mean per-sample entropy (nats)
    sample_counts  ``[B, S, K]`` float32, per-sample argmax voxel counts (valid region)
    sample_labels  ``[B, S, H, W]`` uint8 or None when not requested
    logits         ``[B, K, H, W]`` float32 before the softmax: only from graphs that
                   have it, for bundles that blend logits, and runtimes that fetch it
                   (the embedded one); else None
    prepared       what the caller's ``prepare`` hook of ``infer_many`` made of
                   these outputs, else None
    """

    mean: npt.NDArray[np.float32]
    sample_entropy: npt.NDArray[np.float32]
    sample_counts: npt.NDArray[np.float32]
    sample_labels: npt.NDArray[np.uint8] | None = None
    logits: npt.NDArray[np.float32] | None = None
    prepared: Any = None


#: ``prepare(m, outputs)``: the caller's work on member m's outputs, run by
#: ``infer_many`` where the outputs were made (a runtime's worker thread, while
#: they are in cache); the result becomes ``outputs.prepared``.
PrepareFn = Callable[[int, MemberOutputs], object]


def prepared(outs: list[MemberOutputs], prepare: PrepareFn | None) -> list[MemberOutputs]:
    """``outs`` with ``prepare`` applied to each member (unchanged without one)."""
    if prepare is None:
        return outs
    return [dataclasses.replace(o, prepared=prepare(m, o)) for m, o in enumerate(outs)]


@dataclass(frozen=True)
class ReducedOutputs:
    """All members' outputs for one batch, summed by the server (``reduce="server"``).

    mean_sum           ``[B, K, H, W]`` float32, Σ_m p̄_m
    entropy_sum        ``[B, H, W]`` float32, Σ_m H[p̄_m] (nats)
    sample_entropy_sum ``[B, H, W]`` float32, Σ_m of the mean per-sample entropies
    foreground         ``[B, H, W]`` bool, some member's argmax is a class >= 1
    sample_counts      ``[B, M, S, K]`` float32, every member's per-sample counts
    """

    mean_sum: npt.NDArray[np.float32]
    entropy_sum: npt.NDArray[np.float32]
    sample_entropy_sum: npt.NDArray[np.float32]
    foreground: npt.NDArray[np.bool_]
    sample_counts: npt.NDArray[np.float32]


class Runtime(ABC):
    """Runs batches through all M members of one bundle."""

    name: str = "base"
    #: Slices per call when the caller does not choose (``batch_size=None``).
    preferred_batch_size: int = 8
    #: Arithmetic of the member graphs: ``fp32`` (exact), ``tf32`` or ``fp16``.
    precision: str = "fp32"
    #: True when :meth:`infer_reduced` returns sums made where the members ran
    #: (a Triton ensemble with a reduction step), so fewer bytes travel.
    reduces: bool = False

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the graphs run, e.g. ``cpu`` or ``cuda:0`` or the server URL."""

    @abstractmethod
    def infer(self, batch: Batch, want_samples: bool = False) -> list[MemberOutputs]:
        """Run ``batch`` through every member; element m is member m's outputs."""

    def infer_many(
        self,
        batches: Iterable[Batch],
        want_samples: bool = False,
        prepare: PrepareFn | None = None,
    ) -> Iterator[list[MemberOutputs]]:
        """Results in the order of ``batches``; implementations may pipeline, and run
        ``prepare`` (see ``PrepareFn``) in their own threads."""
        for batch in batches:
            yield prepared(self.infer(batch, want_samples), prepare)

    def infer_reduced(self, batch: Batch) -> ReducedOutputs:
        """The members' outputs for ``batch`` summed (only where ``reduces``)."""
        raise NotImplementedError(f"the {self.name} runtime does not reduce; check .reduces")

    def infer_many_reduced(self, batches: Iterable[Batch]) -> Iterator[ReducedOutputs]:
        """:meth:`infer_reduced` for each batch, in order; implementations may pipeline."""
        for batch in batches:
            yield self.infer_reduced(batch)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions or connections."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
