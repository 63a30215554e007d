"""The same scan through the embedded runtime and through Triton, side by side; prints JSON.

    .venv/bin/python benchmarks/bench_triton.py [--bundle softmax-ensemble | --untrained 5]
        [--shape 256 256 32] [--batch-size 8] [--repeats 3] [--instances 2]

Starts the real tritonserver of the ``server`` extra (python flavour, CPU) on
free loopback ports and runs ``uqserve.predict_volume`` on one
synthetic scan (``uqserve.data.make_volume``) three ways, interleaved so that
load from other processes hits all of them alike:

* ``embedded``: onnxruntime in-process (``EmbeddedRuntime``, CPU);
* ``triton_grpc``: ``TritonRuntime`` over gRPC (tensors in the messages);
* ``triton_shm``: ``TritonRuntime`` with Triton system shared memory;
* ``triton_reduced``: gRPC to the ``--reduce server`` ensemble, which sums
  the members on the server (the repository is written with ``reduce="server"``;
  the other two Triton runs ask for the members' outputs with ``reduce="client"``).

Reports the median wall time of each, the ratios to embedded, the largest
difference between the Triton and embedded maps (~0 for the members' path,
<= 1e-5 with the reduction), and the response bytes per scan of the members'
and the reduced path (tensor payload; the request is the same for both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAPS = ("prob", "tu", "au", "eu")


def untrained_bundle(out: Path, members: int) -> Path:
    """Export ``members`` freshly initialised softmax networks (fixed seeds) as a bundle."""
    import torch

    from uqserve.bundle import InputSpec, Normalization
    from uqserve.exporting import ExportPlan, export_networks
    from uqserve.models import ModelConfig, build_network

    cfg = ModelConfig(num_samples=1)
    nets = []
    for m in range(members):
        torch.manual_seed(1000 + m)
        nets.append(build_network("softmax", cfg).eval())
    plan = ExportPlan(
        name=out.name,
        au="softmax",
        eu="ensemble",
        num_members=members,
        num_samples=1,
        classes=("background", "lesion"),
        input=InputSpec(
            tile_size=(128, 128), multiple=cfg.multiple, normalization=Normalization("zscore")
        ),
    )
    export_networks(nets, out, plan, cfg)
    return out


def response_bytes(rt: Any, volume: Any, batch_size: int) -> dict[str, int]:
    """Output tensor bytes of one scan's requests, members' path vs reduced path."""
    from uqserve.prediction.geometry import plan_slices

    plan = plan_slices(volume, rt.bundle.manifest, batch_size)
    total = {"members": 0, "reduced": 0}
    for z0 in range(0, plan.depth, plan.batch_size):
        b = min(plan.batch_size, plan.depth - z0)
        for mode in total:
            for _, shape, dtype in rt._out_specs(b, plan.pad_h, plan.pad_w, mode):
                total[mode] += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="softmax-ensemble", help="shipped name or folder")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(256, 256, 32), metavar=("X", "Y", "Z")
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=None, help="per member (default 2)")
    parser.add_argument(
        "--untrained",
        type=int,
        default=0,
        metavar="M",
        help="instead of --bundle, export M freshly initialised softmax members with "
        "uqserve.models (needs the export extra; speed does not depend on the weights)",
    )
    args = parser.parse_args()

    from uqserve.bundle import load_bundle
    from uqserve.data import make_volume
    from uqserve.prediction import predict_volume
    from uqserve.runtime.embedded import EmbeddedRuntime
    from uqserve.runtime.triton import TritonRuntime
    from uqserve.serving import TritonServer, write_repository

    volume = make_volume(0, shape=tuple(args.shape)).volume
    runs: dict[str, list[float]] = {
        "embedded": [],
        "triton_grpc": [],
        "triton_shm": [],
        "triton_reduced": [],
    }
    results: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        if args.untrained:
            bundle = load_bundle(untrained_bundle(Path(tmp) / "softmax-untrained", args.untrained))
        else:
            bundle = load_bundle(args.bundle)
        repo = write_repository(
            bundle, Path(tmp) / "repo", "python", instances=args.instances, reduce="server"
        )
        t0 = time.perf_counter()
        with TritonServer(repo) as server:
            startup_s = time.perf_counter() - t0
            runtimes = {
                "embedded": EmbeddedRuntime(bundle, device="cpu"),
                "triton_grpc": TritonRuntime(bundle, [server.grpc_url], reduce="client"),
                "triton_shm": TritonRuntime(
                    bundle, [server.grpc_url], shared_memory=True, reduce="client"
                ),
                "triton_reduced": TritonRuntime(bundle, [server.grpc_url], reduce="server"),
            }
            payload = response_bytes(runtimes["triton_reduced"], volume, args.batch_size)
            try:
                for name, rt in runtimes.items():  # warm-up: sessions, connections, regions
                    results[name] = predict_volume(volume, runtime=rt, batch_size=args.batch_size)
                for _ in range(args.repeats):
                    for name, rt in runtimes.items():
                        t = time.perf_counter()
                        predict_volume(volume, runtime=rt, batch_size=args.batch_size)
                        runs[name].append(time.perf_counter() - t)
            finally:
                for rt in runtimes.values():
                    rt.close()

    median = {k: statistics.median(v) for k, v in runs.items()}
    diff = {
        name: max(
            float(np.abs(getattr(results[name], m) - getattr(results["embedded"], m)).max())
            for m in MAPS
        )
        for name in ("triton_grpc", "triton_shm", "triton_reduced")
    }
    m = bundle.manifest
    out = {
        "bundle": m.name,
        "members": m.num_members,
        "samples": m.num_samples,
        "scan_shape": list(args.shape),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "server_startup_s": round(startup_s, 2),
        "seconds": {k: round(v, 3) for k, v in median.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "ratio_triton_grpc_vs_embedded": round(median["triton_grpc"] / median["embedded"], 3),
        "ratio_triton_shm_vs_embedded": round(median["triton_shm"] / median["embedded"], 3),
        "ratio_triton_shm_vs_grpc": round(median["triton_shm"] / median["triton_grpc"], 3),
        "ratio_triton_reduced_vs_grpc": round(median["triton_reduced"] / median["triton_grpc"], 3),
        "response_bytes_per_scan": payload,
        "response_bytes_ratio_reduced_vs_members": round(
            payload["reduced"] / payload["members"], 4
        ),
        "max_abs_diff_vs_embedded": diff,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
