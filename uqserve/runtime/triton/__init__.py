"""Triton runtime: batches go to a tritonserver's ensemble over gRPC.

``TritonRuntime(bundle, ["grpc://host:8001", ...])`` sends each ``Batch`` to
the ensemble named after the bundle (``<bundle>_nosamples`` when sample labels
are not wanted, so the members never compute them) and turns the
``mean_<m>``, ``sample_entropy_<m>``, ``sample_counts_<m>`` and
``sample_labels_<m>`` outputs back into ``MemberOutputs``.

- Several servers: requests go round-robin; a server that fails with a
  transient error (unavailable, deadline, overload) is skipped for a back-off
  period while the request is retried on the next one.
- Before first use every server is checked: live, model ready, and serving the
  same bundle (name, manifest version, member sha256) as the local manifest.
- ``infer_many`` keeps ``max_in_flight`` batches in flight on worker threads
  and yields results in order.
- ``shared_memory=True`` (same-host servers only) passes tensors through
  Triton system shared memory instead of the gRPC message.
- A repository written with ``reduce="server"`` sums the members on the
  server (ensemble ``<bundle>_reduced``): the runtime then ``reduces`` and
  ``infer_reduced`` receives K + 2 numbers per voxel instead of M x (K + 1).
  ``reduce="auto"`` (default) uses it when every server offers it.

Modules: ``servers`` (URLs, health checks, the errors), ``shm`` (shared
memory slots), ``checks`` (a batch against the bundle, a served model against
the manifest), ``client`` (``TritonRuntime``).
"""

from __future__ import annotations

from uqserve.runtime.triton.client import TritonRuntime
from uqserve.runtime.triton.servers import (
    DEFAULT_GRPC_PORT,
    DEFAULT_TIMEOUT_S,
    HEALTH_TIMEOUT_S,
    TritonMismatchError,
    TritonNotReadyError,
    TritonUnavailableError,
    any_server_live,
    parse_server,
)

__all__ = [
    "DEFAULT_GRPC_PORT",
    "DEFAULT_TIMEOUT_S",
    "HEALTH_TIMEOUT_S",
    "TritonMismatchError",
    "TritonNotReadyError",
    "TritonRuntime",
    "TritonUnavailableError",
    "any_server_live",
    "parse_server",
]
