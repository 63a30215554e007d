"""The embedded runtime: every member graph in-process with onnxruntime.

One ``InferenceSession`` per member. On CPU each session uses all cores for
intra-op parallelism (members run one after another, so they never compete).
Only the outputs the caller needs are fetched: ``sample_labels`` is large
(``[B, S, H, W]``) and is requested only with ``want_samples``.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from uqserve.bundle import Bundle, BundleError
from uqserve.runtime.base import (
    INPUT_NAMES,
    OUTPUT_NAMES,
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
    (default: all cores of this process).
    """

    name = "embedded"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None) -> None:
        super().__init__(bundle)
        import onnxruntime as ort

        if device not in DEVICES:
            raise ValueError(f"device {device!r} unknown; use one of {', '.join(DEVICES)}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        use_cuda = device == "cuda" or (device == "auto" and cuda_available())
        if device == "cuda" and not cuda_available():
            raise RuntimeError_(
                "device cuda requested but no usable GPU with onnxruntime's CUDA provider; "
                "use --device cpu"
            )
        providers: list[str] = ["CPUExecutionProvider"]
        if use_cuda:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.threads = threads or cpu_count()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
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
        names = list(OUTPUT_NAMES if want_samples else OUTPUT_NAMES[:3])
        results = []
        for sess in self.sessions:
            out = sess.run(names, feeds)
            results.append(
                MemberOutputs(
                    mean=out[0],
                    sample_entropy=out[1],
                    sample_counts=out[2],
                    sample_labels=out[3] if want_samples else None,
                )
            )
        return results

    def close(self) -> None:
        self.sessions = []


def _check_signature(sess: object, path: object, m: int) -> None:
    """The member graph must have the architecture.md inputs and outputs."""
    inputs = {i.name for i in sess.get_inputs()}  # type: ignore[attr-defined]
    outputs = {o.name for o in sess.get_outputs()}  # type: ignore[attr-defined]
    missing = [n for n in INPUT_NAMES if n not in inputs] + [
        n for n in OUTPUT_NAMES if n not in outputs
    ]
    if missing:
        raise BundleError(
            f"{path}: member {m} lacks {', '.join(missing)} (see docs/architecture.md); "
            "re-export the bundle with uqserve export"
        )
