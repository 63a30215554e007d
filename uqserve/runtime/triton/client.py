"""``TritonRuntime``: the runtime interface over one or more Triton servers."""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from uqserve.bundle import Bundle
from uqserve.contracts import reduced_outputs
from uqserve.errors import UsageError
from uqserve.runtime.base import (
    Batch,
    MemberOutputs,
    PrepareFn,
    ReducedOutputs,
    Runtime,
    RuntimeServiceError,
    prepared,
)
from uqserve.runtime.triton.checks import _check_batch, _describe_mismatch
from uqserve.runtime.triton.servers import (
    _LOOPBACK,
    _TRANSIENT,
    DEFAULT_TIMEOUT_S,
    HEALTH_TIMEOUT_S,
    TritonMismatchError,
    TritonNotReadyError,
    TritonUnavailableError,
    _short,
    parse_server,
)
from uqserve.runtime.triton.shm import _ShmSlot
from uqserve.triton_names import (
    REDUCE_PARAMETER,
    manifest_identity,
    nosamples_model_name,
    reduced_model_name,
    served_identity,
)

_T = TypeVar("_T")


@dataclass
class _Server:
    url: str
    target: str
    verified: bool = False
    reduces: bool = False  # serves <bundle>_reduced
    logits: bool = False  # its ensembles return the members' optional logits
    down_until: float = 0.0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def local(self) -> bool:
        host = self.target.rsplit(":", 1)[0]
        return host in _LOOPBACK or host.startswith("127.")


class TritonRuntime(Runtime):
    """Runs batches on one or more tritonservers that serve ``bundle``.

    ``servers``: gRPC URLs (``grpc://HOST:PORT``). ``timeout_s``: per request.
    ``deadline_s``: the most one ``infer`` or one ``infer_many`` (a whole scan)
    may take, retries included (``None``: no limit beyond the retries).
    ``max_in_flight``: batches sent concurrently by ``infer_many``.
    ``retries``: extra attempts on transient errors, with exponential back-off
    starting at ``backoff_s`` and moving to the next server each time. After a
    failed attempt the server's health is checked: when no server answers it
    (stopped, hung, gone) the call fails at once instead of retrying.
    ``shared_memory``: pass tensors through Triton system shared memory
    (servers on this host only). ``reduce``: ``auto`` (use the server-side
    reduction when every server has it), ``client`` (never) or ``server``
    (required: an error if a server lacks it).
    """

    name = "triton"

    def __init__(
        self,
        bundle: Bundle,
        servers: Sequence[str],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        deadline_s: float | None = None,
        max_in_flight: int = 4,
        retries: int = 3,
        backoff_s: float = 0.2,
        shared_memory: bool = False,
        reduce: str = "auto",
    ) -> None:
        super().__init__(bundle)
        if reduce not in ("auto", "client", "server"):
            raise UsageError(f"reduce must be 'auto', 'client' or 'server', got {reduce!r}")
        self._reduce = reduce
        self._reduce_decided = False
        if isinstance(servers, str):
            servers = [servers]
        if not servers:
            raise UsageError("no server given: pass at least one grpc://HOST:PORT")
        if not timeout_s > 0:
            raise UsageError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if deadline_s is not None and not deadline_s > 0:
            raise UsageError(f"deadline_s must be > 0 seconds or None, got {deadline_s}")
        if max_in_flight < 1:
            raise UsageError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if retries < 0:
            raise UsageError(f"retries must be >= 0, got {retries}")
        try:
            import tritonclient.grpc  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a base dependency
            raise RuntimeServiceError(
                "tritonclient is not installed: pip install 'tritonclient[grpc]'"
            ) from exc
        self._servers = [_Server(*parse_server(s)) for s in servers]
        if shared_memory:
            remote = [s.url for s in self._servers if not s.local]
            if remote:
                raise UsageError(
                    f"shared memory needs servers on this host; {', '.join(remote)} is not "
                    "(pass `shared_memory=False`)"
                )
        self.timeout_s = float(timeout_s)
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        self.max_in_flight = int(max_in_flight)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.shared_memory = bool(shared_memory)
        self.model_name = bundle.manifest.name
        self._identity = manifest_identity(bundle)
        self._robin = itertools.count()
        self._local = threading.local()
        self._clients: list[Any] = []
        self._slots: list[_ShmSlot] = []
        self._clients_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        # Check every server now: a mismatch is an error even if another server is fine.
        errors: list[TritonUnavailableError] = []
        for server in self._servers:
            try:
                self._verify(server)
            except TritonUnavailableError as exc:
                errors.append(exc)
                server.last_error = str(exc)
                server.down_until = time.monotonic() + self.backoff_s
        if len(errors) == len(self._servers):
            not_ready = any(isinstance(e, TritonNotReadyError) for e in errors)
            cls = TritonNotReadyError if not_ready else TritonUnavailableError
            raise cls(self._unavailable_message())
        verified = [s for s in self._servers if s.verified]
        self.reduces = self._reduce != "client" and all(s.reduces for s in verified)
        if self._reduce == "server" and not self.reduces:
            lacking = ", ".join(s.url for s in verified if not s.reduces)
            raise RuntimeServiceError(
                f"{lacking}: the repository does not reduce on the server; write it with "
                "`uqserve repo --reduce server` or use reduce 'auto'"
            )
        self._reduce_decided = True

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> str:
        return ",".join(s.url for s in self._servers)

    @property
    def servers(self) -> list[str]:
        return [s.url for s in self._servers]

    # ------------------------------------------------------------------ clients
    def _client(self, server: _Server) -> Any:
        import tritonclient.grpc as grpcclient

        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(server.target)
        if client is None:
            client = grpcclient.InferenceServerClient(
                server.target,
                channel_args=[
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", -1),
                ],
            )
            clients[server.target] = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _slot(self, server: _Server, client: Any) -> _ShmSlot:
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = {}
        slot = slots.get(server.target)
        if slot is None:
            slot = _ShmSlot(client, f"uqserve-{uuid.uuid4().hex[:12]}")
            slots[server.target] = slot
            with self._clients_lock:
                self._slots.append(slot)
        return slot

    # ------------------------------------------------------------------ verification
    def _verify(self, server: _Server) -> None:
        """Live, model ready, same bundle; raises Unavailable or Mismatch."""
        from tritonclient.utils import InferenceServerException

        with server.lock:
            if server.verified:
                return
            client = self._client(server)
            timeout = min(self.timeout_s, 10.0)
            try:
                client.is_server_live(client_timeout=timeout)
            except InferenceServerException as exc:
                raise TritonUnavailableError(
                    f"{server.url}: server unreachable ({_short(exc)}); start one with "
                    "`uqserve serve` or check `servers`"
                ) from exc
            try:
                ready = all(
                    client.is_model_ready(n, client_timeout=timeout)
                    for n in (self.model_name, nosamples_model_name(self.model_name))
                )
                if not ready:
                    served = sorted(
                        m.name
                        for m in client.get_model_repository_index(client_timeout=timeout).models
                        if m.state == "READY"
                    )
                    raise TritonNotReadyError(
                        f"{server.url}: model {self.model_name!r} is not ready there (ready: "
                        f"{', '.join(served) or 'none'}); serve it with "
                        f"`uqserve serve --bundle {self.bundle.path}`"
                    )
                config = client.get_model_config(self.model_name, client_timeout=timeout).config
            except InferenceServerException as exc:
                if (exc.status() or "") in _TRANSIENT:
                    raise TritonUnavailableError(f"{server.url}: {_short(exc)}") from exc
                raise RuntimeServiceError(
                    f"{server.url}: cannot query model {self.model_name!r}: {_short(exc)}"
                ) from exc
            self._check_reduce(server, client, config, timeout)
            # Bundles that blend logits take the members' own (as embedded) where served.
            outputs = {o.name for o in config.output}
            server.logits = self.bundle.manifest.input.blend == "logits" and all(
                f"logits_{i}" in outputs for i in range(self.bundle.manifest.num_members)
            )
            served_id = served_identity(config)
            mismatch = _describe_mismatch(self._identity, served_id)
            if mismatch:
                raise TritonMismatchError(
                    f"{server.url}: served model {self.model_name!r} does not match the local "
                    f"bundle {self.bundle.path} ({mismatch}); serve this bundle or use the "
                    "bundle the server was built from"
                )
            server.verified = True

    def _check_reduce(self, server: _Server, client: Any, config: Any, timeout: float) -> None:
        """Does ``server`` reduce? A late server must agree with the decision made at start."""
        flag = config.parameters[REDUCE_PARAMETER].string_value if (
            REDUCE_PARAMETER in config.parameters
        ) else ""  # fmt: skip
        server.reduces = flag == "server" and self._reduce != "client"
        if server.reduces and not client.is_model_ready(
            reduced_model_name(self.model_name), client_timeout=timeout
        ):
            raise TritonNotReadyError(
                f"{server.url}: model {reduced_model_name(self.model_name)!r} is not ready"
            )
        if self._reduce_decided and self.reduces and not server.reduces:
            raise TritonMismatchError(
                f"{server.url}: does not reduce on the server but the other servers do; "
                "serve the same repository everywhere"
            )

    def _unavailable_message(self) -> str:
        details = "; ".join(s.last_error or f"{s.url}: no answer" for s in self._servers)
        return f"no Triton server reachable ({details})"

    # ------------------------------------------------------------------ inference
    def _pick(self) -> _Server:
        now = time.monotonic()
        n = len(self._servers)
        start = next(self._robin)
        for i in range(n):
            s = self._servers[(start + i) % n]
            if s.down_until <= now:
                return s
        # All in back-off: take the one that recovers first.
        return min(self._servers, key=lambda s: s.down_until)

    def infer(self, batch: Batch, want_samples: bool = False) -> list[MemberOutputs]:
        return self._members(self._call(batch, _mode(want_samples), self._deadline()))

    def infer_reduced(self, batch: Batch) -> ReducedOutputs:
        self._check_reduces()
        return _reduced(self._call(batch, "reduced", self._deadline()))

    def _check_reduces(self) -> None:
        if not self.reduces:
            raise RuntimeServiceError("the servers do not reduce (see .reduces); use infer()")

    def _members(self, got: dict[str, npt.NDArray[Any]]) -> list[MemberOutputs]:
        return [
            MemberOutputs(
                mean=got[f"mean_{i}"],
                sample_entropy=got[f"sample_entropy_{i}"],
                sample_counts=got[f"sample_counts_{i}"],
                sample_labels=got.get(f"sample_labels_{i}"),
                logits=got.get(f"logits_{i}"),
            )
            for i in range(self.bundle.manifest.num_members)
        ]

    def _deadline(self) -> float:
        """``time.monotonic()`` value by which the current call must be done."""
        return math.inf if self.deadline_s is None else time.monotonic() + self.deadline_s

    def _call(self, batch: Batch, mode: str, end: float) -> dict[str, npt.NDArray[Any]]:
        """One request with retries and failover, done by ``end`` (``time.monotonic()``).

        ``mode``: samples, members or reduced.
        """
        if self._closed:
            raise RuntimeServiceError("the Triton runtime is closed")
        _check_batch(batch, self.bundle)
        from tritonclient.utils import InferenceServerException

        attempts = self.retries + 1
        silent: set[str] = set()  # servers that failed a request and then the health check
        for attempt in range(attempts):
            server = self._pick()
            wait = min(server.down_until, end) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            timeout = min(self.timeout_s, end - time.monotonic())
            if timeout <= 0:
                break
            try:
                self._verify(server)
                outputs = self._infer_on(server, batch, mode, timeout)
            except TritonUnavailableError as exc:
                self._mark_down(server, str(exc), attempt)
            except InferenceServerException as exc:
                status = exc.status() or ""
                if status not in _TRANSIENT:
                    raise RuntimeServiceError(
                        f"{server.url}: inference failed: {_short(exc)}"
                    ) from exc
                self._mark_down(server, f"{server.url}: {_short(exc)}", attempt)
                # The server may have restarted with another model: check again before reuse.
                server.verified = False
            else:
                return outputs
            if time.monotonic() >= end:
                break
            if not self._answers(server, end):
                silent.add(server.target)
                if len(silent) == len(self._servers):
                    raise TritonUnavailableError(
                        "no server answers its health check after a failed request (stopped, "
                        f"hung or gone): {self._unavailable_message()}"
                    )
        if time.monotonic() >= end:
            raise TritonUnavailableError(
                f"no result within the deadline of {self.deadline_s:g} s: "
                f"{self._unavailable_message()}"
            )
        raise TritonUnavailableError(
            f"inference failed after {attempts} attempt(s): {self._unavailable_message()}"
        )

    def _answers(self, server: _Server, end: float) -> bool:
        """Health check between attempts: does ``server`` answer ``is_server_live`` quickly?"""
        from tritonclient.utils import InferenceServerException

        timeout = min(self.timeout_s, HEALTH_TIMEOUT_S, max(end - time.monotonic(), 0.01))
        try:
            return bool(self._client(server).is_server_live(client_timeout=timeout))
        except InferenceServerException as exc:
            server.last_error = f"{server.url}: {_short(exc)}; health check unanswered"
            return False

    def _mark_down(self, server: _Server, message: str, attempt: int) -> None:
        server.last_error = message
        server.down_until = time.monotonic() + self.backoff_s * (2 ** min(attempt, 6))

    def _out_specs(
        self, b: int, sp: tuple[int, ...], mode: str, logits: bool = False
    ) -> list[tuple[str, tuple[int, ...], Any]]:
        """``(name, shape, dtype)`` of the outputs a ``mode`` request returns (``sp``: H, W
        or D, H, W; ``logits``: the members' optional logits too)."""
        m = self.bundle.manifest
        k, s = m.num_classes, m.num_samples
        if mode == "reduced":
            sizes: dict[str, int | str] = {"B": b, "M": m.num_members, "S": s, "K": k}
            return [
                (name, tuple(int(d) for d in shape), np.dtype(dtype).type)
                for name, dtype, shape in reduced_outputs(sizes, sp)
            ]
        out_specs: list[tuple[str, tuple[int, ...], Any]] = []
        for i in range(m.num_members):
            out_specs += [
                (f"mean_{i}", (b, k, *sp), np.float32),
                (f"sample_entropy_{i}", (b, *sp), np.float32),
                (f"sample_counts_{i}", (b, s, k), np.float32),
            ]
            if mode == "samples":
                out_specs.append((f"sample_labels_{i}", (b, s, *sp), np.uint8))
            if logits:
                out_specs.append((f"logits_{i}", (b, k, *sp), np.float32))
        return out_specs

    def _infer_on(
        self, server: _Server, batch: Batch, mode: str, timeout: float
    ) -> dict[str, npt.NDArray[Any]]:
        import tritonclient.grpc as grpcclient

        b, sp = batch.image.shape[0], tuple(batch.image.shape[2:])
        arrays: list[tuple[str, npt.NDArray[Any], str]] = [
            ("image", np.ascontiguousarray(batch.image, dtype=np.float32), "FP32"),
            ("seed", np.ascontiguousarray(batch.seed, dtype=np.int64).reshape(b, 1), "INT64"),
            ("offset", np.ascontiguousarray(batch.offset, dtype=np.int64).reshape(b, 3), "INT64"),
            ("valid", np.ascontiguousarray(batch.valid, dtype=np.int64).reshape(b, -1), "INT64"),
        ]
        out_specs = self._out_specs(b, sp, mode, logits=server.logits)
        model = {
            "samples": self.model_name,
            "members": nosamples_model_name(self.model_name),
            "reduced": reduced_model_name(self.model_name),
        }[mode]
        client = self._client(server)

        inputs = []
        for name, array, dtype in arrays:
            inp = grpcclient.InferInput(name, list(array.shape), dtype)
            inputs.append(inp)
        outputs = [grpcclient.InferRequestedOutput(name) for name, _, _ in out_specs]

        slot = None
        if self.shared_memory:
            import tritonclient.utils.shared_memory as shm

            slot = self._slot(server, client)
            in_sizes = [a.nbytes for _, a, _ in arrays]
            out_sizes = [int(np.prod(shape)) * np.dtype(dt).itemsize for _, shape, dt in out_specs]
            slot.ensure(sum(in_sizes), sum(out_sizes))
            shm.set_shared_memory_region(slot.in_handle, [a for _, a, _ in arrays])
            offset = 0
            for inp, size in zip(inputs, in_sizes, strict=True):
                inp.set_shared_memory(f"{slot.tag}-in", size, offset)
                offset += size
            offset = 0
            for out, size in zip(outputs, out_sizes, strict=True):
                out.set_shared_memory(f"{slot.tag}-out", size, offset)
                offset += size
        else:
            for inp, (_, array, _) in zip(inputs, arrays, strict=True):
                inp.set_data_from_numpy(array)

        result = client.infer(model, inputs, outputs=outputs, client_timeout=timeout)

        got: dict[str, npt.NDArray[Any]] = {}
        if slot is not None:
            import tritonclient.utils.shared_memory as shm

            offset = 0
            for name, shape, dt in out_specs:
                size = int(np.prod(shape)) * np.dtype(dt).itemsize
                # Copy out: the region is reused by this worker's next request.
                got[name] = shm.get_contents_as_numpy(
                    slot.out_handle, dt, shape, offset=offset
                ).copy()
                offset += size
        else:
            for name, _, dt in out_specs:
                arr = result.as_numpy(name)
                if arr is None:
                    raise RuntimeServiceError(f"{server.url}: response lacks output {name!r}")
                got[name] = arr.astype(dt, copy=False)
        return got

    def infer_many(
        self,
        batches: Iterable[Batch],
        want_samples: bool = False,
        prepare: PrepareFn | None = None,
    ) -> Iterator[list[MemberOutputs]]:
        """Results in the order of ``batches`` with up to ``max_in_flight`` batches in flight
        (``prepare`` runs in the receiving threads).

        One ``deadline_s`` covers all the batches (a scan).
        """
        mode, end = _mode(want_samples), self._deadline()
        return self._pipelined(
            lambda b: prepared(self._members(self._call(b, mode, end)), prepare), batches
        )

    def infer_many_reduced(self, batches: Iterable[Batch]) -> Iterator[ReducedOutputs]:
        """:meth:`infer_reduced` pipelined like :meth:`infer_many`."""
        self._check_reduces()
        end = self._deadline()
        return self._pipelined(lambda b: _reduced(self._call(b, "reduced", end)), batches)

    def _pipelined(self, fn: Callable[[Batch], _T], batches: Iterable[Batch]) -> Iterator[_T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="uqserve-triton")
        pending: deque[Future[_T]] = deque()
        try:
            for batch in batches:
                pending.append(self._pool.submit(fn, batch))
                if len(pending) >= self.max_in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # On error or early stop: drop what has not started, wait for the rest.
            for f in pending:
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    try:
                        f.result()
                    except Exception:
                        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for slot in self._slots:
            try:
                slot.close()
            except Exception:
                pass
        for client in self._clients:
            try:
                client.close()
            except Exception:
                pass
        self._slots.clear()
        self._clients.clear()


def _mode(want_samples: bool) -> str:
    return "samples" if want_samples else "members"


def _reduced(got: dict[str, npt.NDArray[Any]]) -> ReducedOutputs:
    return ReducedOutputs(
        mean_sum=got["mean_sum"],
        entropy_sum=got["entropy_sum"],
        sample_entropy_sum=got["sample_entropy_sum"],
        foreground=got["foreground"],
        sample_counts=got["sample_counts"],
    )
