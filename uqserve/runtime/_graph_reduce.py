"""``reduce="graph"`` of the embedded runtime: the members' outputs summed by an ONNX graph
on the device where the members ran.

Each member runs through an onnxruntime IOBinding whose outputs stay where
the session computed them (``OrtValue`` on the GPU under CUDA); the
reduction graph of :mod:`uqserve.reduction` (the one Triton's ``--reduce
server`` runs) takes them as they are and only its outputs, K + 2 floats
and one bool per voxel plus the sample counts, are copied to the host. On
the CPU execution provider the same code runs with host ``OrtValue`` s (that
is how the tests check it against the host reduction).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from uqserve.bundle import Manifest
from uqserve.contracts import MEMBER_OUTPUTS
from uqserve.reduction import reduce_graph
from uqserve.runtime.base import ReducedOutputs

__all__ = ["GraphReducer"]

_SUMMED = ("mean", "sample_entropy", "sample_counts")
_REDUCED = ("mean_sum", "entropy_sum", "sample_entropy_sum", "foreground", "sample_counts")


class GraphReducer:
    """Runs a batch through every member and the reduction graph, on ``device``.

    ``sessions``: the members' onnxruntime sessions; ``device``: ``cpu`` or
    ``cuda`` (where member outputs are bound); ``options``/``providers``: for
    the reduction graph's own session.
    """

    def __init__(
        self, man: Manifest, sessions: list[Any], device: str, options: Any, providers: list[Any]
    ) -> None:
        import onnxruntime as ort

        assert tuple(MEMBER_OUTPUTS[:3]) == _SUMMED  # the graph's inputs, per member
        graph = reduce_graph(man.num_members, man.num_classes, man.num_samples, dims=2)
        self.session = ort.InferenceSession(graph, sess_options=options, providers=providers)
        self.sessions = sessions
        self.device = "cuda" if device == "cuda" else "cpu"

    def run(self, feeds: dict[str, np.ndarray], pool: ThreadPoolExecutor | None) -> ReducedOutputs:
        """``feeds``: the member inputs of one batch (host arrays)."""
        if pool is None or self.device == "cuda":
            values = [self._member(m, feeds) for m in range(len(self.sessions))]
        else:
            futures = [pool.submit(self._member, m, feeds) for m in range(len(self.sessions))]
            values = [f.result() for f in futures]
        binding = self.session.io_binding()
        for m, outs in enumerate(values):
            for name, value in zip(_SUMMED, outs, strict=True):
                binding.bind_ortvalue_input(f"{name}_{m}", value)
        for name in _REDUCED:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        got = dict(zip(_REDUCED, binding.copy_outputs_to_cpu(), strict=True))
        return ReducedOutputs(
            mean_sum=got["mean_sum"],
            entropy_sum=got["entropy_sum"],
            sample_entropy_sum=got["sample_entropy_sum"],
            foreground=got["foreground"].astype(bool, copy=False),
            sample_counts=got["sample_counts"],
        )

    def _member(self, m: int, feeds: dict[str, np.ndarray]) -> list[Any]:
        """Member m's three summed outputs as ``OrtValue`` s left on the device."""
        sess = self.sessions[m]
        binding = sess.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in _SUMMED:
            binding.bind_output(name, self.device)
        sess.run_with_iobinding(binding)
        outs: list[Any] = binding.get_outputs()
        return outs
