"""The embedded runtime: every member graph in-process with onnxruntime.

One ``InferenceSession`` per member. On CPU the members of a batch run in
parallel threads (onnxruntime releases the GIL), each session with
``cores // workers`` intra-op threads: on small CPUs several single-threaded
members beat one member at a time with all cores (72 vs 85 ms measured on
2 cores). Results are collected in member order, so nothing depends on
scheduling. ``infer_many`` keeps the workers busy across batches:

* with a core to spare (or a GPU doing the work), batch i + 1's members are
  queued before batch i is handed over, so the caller adds batch i up while
  the graphs run;
* with every core taken by the workers, the caller competing with them cost
  more than it saved (on 2 cores, 512 x 512 slices, 5 members: 1.5-1.9 s
  outside the graphs per 16 slices vs 0.7-1.2 s; the members' caches are
  thrashed). Batches are then run in groups (``group_size``) in which every
  worker has as many member runs, no worker idles while the last member of a
  batch finishes, and a group is handed over once complete, while the
  workers wait. A group's outputs stay under ``GROUP_BYTES`` (large 3D
  patches make smaller groups, down to one batch).
Only the outputs the caller needs are fetched: ``sample_labels`` is large
(``[B, S, H, W]``) and is requested only with ``want_samples``.

On CUDA the answer must not depend on the hardware by default:

* ``precision="fp32"`` (default) turns TF32 off (``use_tf32=0``). With
  onnxruntime's default TF32, p̄ differed from the CPU by up to 5.6e-4 and SSN
  labels flipped on the shipped example (H200, onnxruntime-gpu 1.31.1); with
  TF32 off the difference is 5-9e-6. ``"tf32"`` turns it on (about 15 % faster
  per slice: softmax 1.8-2.1 vs 2.2-2.5 ms per 512² slice). ``"fp16"`` runs the
  network body in float16 (``uqserve.runtime._fp16``), as torch autocast does.
* cuDNN picks convolution algorithms with ``HEURISTIC`` search: ``EXHAUSTIVE``
  (onnxruntime's default) spent 0.86 s on the first call vs 0.07 s for the same
  steady-state speed, and it repeats for every new input shape.
* Sessions live as long as the runtime: ``predict`` over many scans and the
  sidecar open one runtime and reuse it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from uqserve.bundle import Bundle, BundleError
from uqserve.contracts import MEMBER_INPUT_SPEC, MEMBER_INPUTS, MEMBER_OUTPUTS
from uqserve.errors import UsageError
from uqserve.runtime.base import (
    Batch,
    MemberOutputs,
    PrepareFn,
    ReducedOutputs,
    Runtime,
    RuntimeServiceError,
)

if TYPE_CHECKING:
    from uqserve.runtime._graph_reduce import GraphReducer

DEVICES = ("auto", "cpu", "cuda")
REDUCE_MODES = ("auto", "graph", "host")
#: ``fp32``: exact float32 (the default); ``tf32``: TF32 tensor-core matmuls and
#: convolutions on CUDA; ``fp16``: float16 network body on CUDA.
PRECISIONS = ("fp32", "tf32", "fp16")
CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and cgroup pinning)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cuda_provider_options(
    precision: str = "fp32", conv_algo_search: str = "HEURISTIC", device_id: int = 0
) -> dict[str, str]:
    """onnxruntime CUDA execution provider options for ``precision`` (see the module doc)."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if conv_algo_search not in CONV_ALGO_SEARCHES:
        raise UsageError(
            f"conv_algo_search {conv_algo_search!r} unknown; use one of "
            f"{', '.join(CONV_ALGO_SEARCHES)}"
        )
    return {
        "device_id": str(device_id),
        "use_tf32": "1" if precision == "tf32" else "0",
        "cudnn_conv_algo_search": conv_algo_search,
    }


def session_providers(
    use_cuda: bool, precision: str = "fp32", conv_algo_search: str = "HEURISTIC"
) -> list[str | tuple[str, dict[str, str]]]:
    """The ``providers`` argument of every member's ``InferenceSession``.

    Raises ``UsageError`` for an unknown precision or search, and for a
    precision other than ``fp32`` without CUDA.
    """
    options = cuda_provider_options(precision, conv_algo_search)
    if not use_cuda:
        if precision != "fp32":
            raise UsageError(
                f"precision {precision!r} needs a GPU (device cuda) and this runtime runs on "
                "the CPU; use precision 'fp32'"
            )
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


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


#: Outputs a group of batches may hold (the caller gets them all at once).
GROUP_BYTES = 256 << 20


def group_size(members: int, workers: int, rounds: int = 8) -> int:
    """Batches run together when every core is taken (see the module doc).

    A multiple of ``workers / gcd(members, workers)``, so that every worker gets
    as many member runs, with at least ``rounds`` runs per worker: the workers
    wait for the slowest at the end of a group (5 members on 2 workers: 4
    batches, 20 runs). One worker never waits for another: 1.
    """
    if workers <= 1:
        return 1
    base = workers // math.gcd(members, workers)
    return base * max(1, math.ceil(rounds * workers / (base * members)))


class EmbeddedRuntime(Runtime):
    """Run a bundle's member graphs in this process.

    ``device``: ``cpu``, ``cuda`` (error if no usable GPU) or ``auto`` (CUDA
    when a GPU is usable, else CPU). ``threads``: intra-op threads per session
    (default: the cores of this process shared among the members that run at
    once). ``workers``: members run at once (default: min(cores, M) on CPU, 1 on
    CUDA). ``precision``: ``fp32`` (default, exact), ``tf32`` or ``fp16``; the
    last two need CUDA and raise ``UsageError`` on a CPU (``tf32`` does nothing
    there, and float16 convolutions on a CPU are slower and change the answer).
    ``conv_algo_search``: cuDNN's algorithm search (``HEURISTIC`` by default).
    ``reduce``: ``graph`` sums the members' outputs with the reduction graph
    where they ran (only the sums reach the host, ``infer_reduced``),
    ``host`` hands every member's outputs over; ``auto``: graph on CUDA.
    """

    name = "embedded"

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        threads: int | None = None,
        workers: int | None = None,
        precision: str = "fp32",
        conv_algo_search: str = "HEURISTIC",
        reduce: str = "auto",
    ) -> None:
        super().__init__(bundle)
        import onnxruntime as ort

        if reduce not in REDUCE_MODES:
            raise UsageError(f"reduce {reduce!r} unknown; use one of {', '.join(REDUCE_MODES)}")
        if device not in DEVICES:
            raise UsageError(f"device {device!r} unknown; use one of {', '.join(DEVICES)}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        if workers is not None and workers < 1:
            raise UsageError(f"workers must be >= 1, got {workers}")
        use_cuda = device == "cuda" or (device == "auto" and cuda_available())
        if device == "cuda" and not cuda_available():
            raise RuntimeServiceError(
                "device cuda requested but no usable GPU with onnxruntime's CUDA provider; "
                'use `device="cpu"`'
            )
        providers = session_providers(use_cuda, precision, conv_algo_search)
        self.precision = precision
        cores, members = cpu_count(), bundle.manifest.num_members
        self.workers = workers or (1 if use_cuda else max(1, min(cores, members)))
        self.threads = threads or max(1, cores // self.workers)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            self.workers, thread_name_prefix="uqserve-member"
        )
        self._overlap = use_cuda or self.workers * self.threads < cores
        self._group = group_size(members, self.workers)
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
        # ENABLE_ALL (onnxruntime's default, stated so that nobody lowers it): on the
        # shipped bundles' 256² slices, 1 thread, softmax 89 vs 157 ms with EXTENDED,
        # SSN 257 vs 262 ms; the levels differ by up to 5e-7 in p̄, so this is also
        # the level the golden outputs were made with.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions: list[ort.InferenceSession] = []
        for m in range(bundle.manifest.num_members):
            path = bundle.member_path(m)
            model: str | bytes = str(path)
            if precision == "fp16":
                from uqserve.runtime._fp16 import fp16_member

                model = fp16_member(path, bundle.manifest.members[m].sha256)
            try:
                sess = ort.InferenceSession(model, sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BundleError(
                    f"{path}: member {m} cannot be loaded by onnxruntime ({first[:300]}); "
                    "re-export the bundle"
                ) from exc
            _check_signature(sess, path, m)
            self.sessions.append(sess)
        # Bundles that blend logits: fetch them where every graph has them.
        self._logits = bundle.manifest.input.blend == "logits" and all(
            "logits" in {o.name for o in s.get_outputs()} for s in self.sessions
        )
        active = self.sessions[0].get_providers()[0] if self.sessions else "CPUExecutionProvider"
        if device == "cuda" and active != "CUDAExecutionProvider":
            raise RuntimeServiceError(
                "device cuda requested but onnxruntime fell back to CPU (CUDA/cuDNN libraries "
                'missing?); use `device="cpu"`'
            )
        self._device = "cuda" if active == "CUDAExecutionProvider" else "cpu"
        # On a CPU one 256 x 256 slice's activations already fill the caches; larger
        # batches ran 1.2-1.4x slower (benchmarks/bench_predict.py). A GPU wants them.
        self.preferred_batch_size = 8 if self._device == "cuda" else 1
        self._reducer = self._graph_reducer(reduce, opts, providers)
        self.reduces = self._reducer is not None

    @property
    def device(self) -> str:
        return self._device

    def _graph_reducer(self, reduce: str, opts: Any, providers: list[Any]) -> GraphReducer | None:
        """The reduction graph's runner for ``reduce`` (None: the host sums)."""
        graph = reduce == "graph" or (reduce == "auto" and self._device == "cuda")
        if not graph or self.bundle.manifest.input.dims != 2:  # 3D bundles run in windows
            return None
        from uqserve.runtime._graph_reduce import GraphReducer

        return GraphReducer(self.bundle.manifest, self.sessions, self._device, opts, providers)

    def infer(self, batch: Batch, want_samples: bool = False) -> list[MemberOutputs]:
        return self._collect(self._submit(batch, want_samples, None))

    def infer_many(
        self,
        batches: Iterable[Batch],
        want_samples: bool = False,
        prepare: PrepareFn | None = None,
    ) -> Iterator[list[MemberOutputs]]:
        """Results in order; how batches overlap depends on the cores (module doc).
        ``prepare`` runs in the worker, right after the member's graph."""
        pending: deque[list[Future[MemberOutputs]]] = deque()
        group = 0
        try:
            for batch in batches:
                group = group or self._group_for(batch, want_samples)
                pending.append(self._submit(batch, want_samples, prepare))
                if self._overlap and len(pending) == 2:
                    yield self._collect(pending.popleft())
                elif not self._overlap and len(pending) == group:
                    yield from self._collect_all(pending)
            yield from self._collect_all(pending)
        finally:  # the caller stopped early or a member failed: drop what has not started
            for futures in pending:
                for future in futures:
                    future.cancel()

    def _group_for(self, batch: Batch, want_samples: bool) -> int:
        """``group_size``, less when a group's outputs would pass ``GROUP_BYTES`` (large
        3D patches): then the largest multiple of the base size that fits, else 1."""
        man = self.bundle.manifest
        voxels = int(np.prod(batch.image.shape)) // max(1, int(batch.image.shape[1]))
        per_voxel = 4 * (man.num_classes + 1) + (man.num_samples if want_samples else 0)
        batch_bytes = voxels * per_voxel * man.num_members
        base = group_size(man.num_members, self.workers, rounds=1)
        fits = GROUP_BYTES // max(1, batch_bytes)
        if fits >= self._group:
            return self._group
        return max(1, fits // base * base)

    def _collect_all(
        self, pending: deque[list[Future[MemberOutputs]]]
    ) -> Iterator[list[MemberOutputs]]:
        """Wait for every pending batch, then hand them over (the workers are idle while
        the caller works, so nobody competes for the cores)."""
        results = [self._collect(futures) for futures in pending]
        pending.clear()
        yield from results

    def _submit(
        self, batch: Batch, want_samples: bool, prepare: PrepareFn | None
    ) -> list[Future[MemberOutputs]]:
        if self._pool is None:
            raise RuntimeServiceError("the embedded runtime is closed; open a new one")
        feeds = {
            name: np.ascontiguousarray(array, dtype=MEMBER_INPUT_SPEC[name][0])
            for name, array in batch.feeds().items()
        }
        names = list(MEMBER_OUTPUTS if want_samples else MEMBER_OUTPUTS[:3])
        if self._logits:
            names.append("logits")

        def run(m: int) -> MemberOutputs:
            out = self.sessions[m].run(names, feeds)
            outputs = MemberOutputs(
                mean=out[0],
                sample_entropy=out[1],
                sample_counts=out[2],
                sample_labels=out[3] if want_samples else None,
                logits=out[-1] if self._logits else None,
            )
            if prepare is None:
                return outputs
            return dataclasses.replace(outputs, prepared=prepare(m, outputs))

        return [self._pool.submit(run, m) for m in range(len(self.sessions))]

    def infer_reduced(self, batch: Batch) -> ReducedOutputs:
        """Every member's outputs for ``batch``, summed by the reduction graph."""
        if self._reducer is None or self._pool is None:
            raise RuntimeServiceError("this runtime does not reduce (see .reduces); use infer()")
        feeds = {
            name: np.ascontiguousarray(array, dtype=MEMBER_INPUT_SPEC[name][0])
            for name, array in batch.feeds().items()
        }
        return self._reducer.run(feeds, self._pool)

    @staticmethod
    def _collect(futures: list[Future[MemberOutputs]]) -> list[MemberOutputs]:
        """Member m's outputs from ``futures[m]``, in member order."""
        return [future.result() for future in futures]

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
