"""The sidecar's predictor: one ``uqserve.Predictor`` for every series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from uqserve.errors import UsageError
from uqserve.prediction import Predictor, RuntimeOptions
from uqserve.runtime import Runtime
from uqserve.volumes import Volume

__all__ = ["BundlePredictor", "PredictionLike"]

_DEVICES = ("auto", "cpu", "cuda")  # as uqserve.runtime.embedded.DEVICES, without importing it


class PredictionLike(Protocol):
    """What the sidecar needs from a prediction (``uqserve.Prediction``)."""

    seg: npt.NDArray[np.uint8]
    prob: npt.NDArray[np.float32]
    tu: npt.NDArray[np.float32]
    au: npt.NDArray[np.float32]
    eu: npt.NDArray[np.float32]

    @property
    def report(self) -> Mapping[str, Any]: ...


class BundlePredictor(Predictor):
    """The sidecar's :class:`uqserve.Predictor`, called once per series.

    The runtime (embedded onnxruntime, or Triton when ``servers`` are given)
    opens once (``open()``, before the sidecar listens) and its sessions serve
    every series; after a runtime failure it is closed so the next series
    reconnects (a bad series, a ``ValueError``, keeps it open).
    """

    def __init__(
        self,
        bundle: str | None = None,
        servers: Sequence[str] = (),
        *,
        seed: int | None = None,
        device: str = "auto",
    ) -> None:
        if device not in _DEVICES:
            raise UsageError(f"device {device!r} unknown; use one of {', '.join(_DEVICES)}")
        super().__init__(bundle, RuntimeOptions(device=device, servers=tuple(servers)), seed=seed)
        self._loaded = False  # opened once: later it reopens by itself after a failure

    @property
    def servers(self) -> tuple[str, ...]:
        return self.options.servers

    def open(self) -> Runtime:
        runtime = super().open()
        self._loaded = True
        return runtime

    def ready(self) -> str | None:
        """Why no series could be predicted now, or None (for the readiness probe).

        In-process: the runtime has been opened (it reopens by itself after a
        failure). With Triton: a server answers its health check now.
        """
        if not self.servers:
            return None if self._loaded else "the in-process runtime is not loaded yet"
        from uqserve.runtime.triton import any_server_live

        if any_server_live(self.servers, timeout_s=2.0):
            return None
        return f"no Triton server answers ({', '.join(self.servers)})"

    def __call__(self, volume: Volume) -> PredictionLike:
        return self.predict(volume)
