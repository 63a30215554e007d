"""The embedded runtime: every member graph in-process with onnxruntime.

One ``InferenceSession`` per member. On CPU the members of a batch run in
parallel threads (onnxruntime releases the GIL), each session with
``cores // workers`` intra-op threads: on small CPUs several single-threaded
members beat one member at a time with all cores (DESIGN.md measured 72 vs
85 ms on 2 cores). Results are collected in member order, so nothing depends
on scheduling.
Only the outputs the caller needs are fetched: ``sample_labels`` is large
(``[B, S, H, W]``) and is requested only with ``want_samples``.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from uqserve.bundle import Bundle, BundleError
from uqserve.contracts import MEMBER_INPUTS, MEMBER_OUTPUTS
from uqserve.runtime.base import (
    Batch,
    MemberOutputs,
    Runtime,
    RuntimeError_,
)

DEVICES = ("auto", "cpu", "cuda")


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and cgroup pinning)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cuda_available() -> bool:
    """True when onnxruntime has the CUDA provider and the driver sees a GPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # onnxruntime-gpu lists the CUDA provider on machines without a GPU; ask the driver.
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    except OSError:
        return False


class EmbeddedRuntime(Runtime):
    """Run a bundle's member graphs in this process.

    ``device``: ``cpu``, ``cuda`` (error if no usable GPU) or ``auto`` (CUDA
    when a GPU is usable, else CPU). ``threads``: intra-op threads per session
    (default: the cores of this process shared among the members that run at
    once). ``workers``: members run at once (default: min(cores, M) on CPU, 1 on
    CUDA).
    """

    name = "embedded"

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        threads: int | None = None,
        workers: int | None = None,
    ) -> None:
        super().__init__(bundle)
        import onnxruntime as ort

        if device not in DEVICES:
            raise ValueError(f"device {device!r} unknown; use one of {', '.join(DEVICES)}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        use_cuda = device == "cuda" or (device == "auto" and cuda_available())
        if device == "cuda" and not cuda_available():
            raise RuntimeError_(
                "device cuda requested but no usable GPU with onnxruntime's CUDA provider; "
                "use --device cpu"
            )
        providers: list[str] = ["CPUExecutionProvider"]
        if use_cuda:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        cores, members = cpu_count(), bundle.manifest.num_members
        self.workers = workers or (1 if use_cuda else max(1, min(cores, members)))
        self.threads = threads or max(1, cores // self.workers)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle pool threads of one member's session spin and steal the cores from the
        # next member's run: with spinning, members called in turn ran 1.7x slower.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The memory pattern plans one block for all tensors of a call; without it a
        # chunked S = 64 graph peaks at about half (benchmarks/bench_predict.py).
        opts.enable_mem_pattern = False
        opts.log_severity_level = 3  # errors only: no unused-initializer chatter
        self.sessions: list[ort.InferenceSession] = []
        for m in range(bundle.manifest.num_members):
            path = bundle.member_path(m)
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BundleError(
                    f"{path}: member {m} cannot be loaded by onnxruntime ({first[:300]}); "
                    "re-export the bundle"
                ) from exc
            _check_signature(sess, path, m)
            self.sessions.append(sess)
        active = self.sessions[0].get_providers()[0] if self.sessions else "CPUExecutionProvider"
        if device == "cuda" and active != "CUDAExecutionProvider":
            raise RuntimeError_(
                "device cuda requested but onnxruntime fell back to CPU (CUDA/cuDNN libraries "
                "missing?); use --device cpu"
            )
        self._device = "cuda" if active == "CUDAExecutionProvider" else "cpu"
        # On a CPU one 256 x 256 slice's activations already fill the caches; larger
        # batches ran 1.2-1.4x slower (benchmarks/bench_predict.py). A GPU wants them.
        self.preferred_batch_size = 8 if self._device == "cuda" else 1

    @property
    def device(self) -> str:
        return self._device

    def infer(self, batch: Batch, want_samples: bool = False) -> list[MemberOutputs]:
        feeds = {
            "image": np.ascontiguousarray(batch.image, dtype=np.float32),
            "seed": np.ascontiguousarray(batch.seed, dtype=np.int64),
            "offset": np.ascontiguousarray(batch.offset, dtype=np.int64),
            "valid": np.ascontiguousarray(batch.valid, dtype=np.int64),
        }
        names = list(MEMBER_OUTPUTS if want_samples else MEMBER_OUTPUTS[:3])
        if self._pool is None:
            outs = [sess.run(names, feeds) for sess in self.sessions]
        else:
            outs = list(self._pool.map(lambda sess: sess.run(names, feeds), self.sessions))
        return [
            MemberOutputs(
                mean=out[0],
                sample_entropy=out[1],
                sample_counts=out[2],
                sample_labels=out[3] if want_samples else None,
            )
            for out in outs
        ]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.sessions = []


def _check_signature(sess: object, path: object, m: int) -> None:
    """The member graph must have the architecture.md inputs and outputs."""
    inputs = {i.name for i in sess.get_inputs()}  # type: ignore[attr-defined]
    outputs = {o.name for o in sess.get_outputs()}  # type: ignore[attr-defined]
    missing = [n for n in MEMBER_INPUTS if n not in inputs] + [
        n for n in MEMBER_OUTPUTS if n not in outputs
    ]
    if missing:
        raise BundleError(
            f"{path}: member {m} lacks {', '.join(missing)} (see docs/architecture.md); "
            "re-export the bundle with uqserve export"
        )
