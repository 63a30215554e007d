"""Sampling inside one member graph vs re-running the network, and onnxruntime vs PyTorch.

Prints one JSON object:

- ``shared_backbone``: an SSN member graph that runs the backbone once and
  draws S samples from the head, against a graph with S = 1 run S times
  (what re-running the whole network per sample costs). Target ratio >= 5x.
- ``ort_vs_torch``: one member (softmax and SSN) in onnxruntime against the
  same module in eager PyTorch, same inputs, same thread count.

Usage: ``.venv/bin/python benchmarks/bench_sampling.py [--samples 16] [--size 128] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _side_by_side(
    a: Callable[[], object], b: Callable[[], object], repeat: int
) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, timed alternately so both see the same load."""
    a()
    b()  # warm-up
    ta, tb = [], []
    for _ in range(repeat):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return float(np.median(ta)), float(np.median(tb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from uqserve.exporting import export_member, parity_feeds
    from uqserve.models import ModelConfig, build_network, member_graph

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = args.samples
    feeds = parity_feeds(1, (args.size, args.size), batch=args.batch)
    tfeeds = [torch.from_numpy(feeds[n]) for n in ("image", "seed", "offset", "valid")]

    def session(path: Path) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    out: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
        "batch": args.batch,
        "size": args.size,
        "model": {"width": args.width, "depth": args.depth},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig(width=args.width, depth=args.depth, num_samples=s)
        ssn = build_network("ssn", cfg).eval()
        many = member_graph(ssn, 0, s)
        one = member_graph(ssn, 0, 1)
        p_many = export_member(
            many, Path(tmp) / "s.onnx", in_channels=1, num_classes=2, num_samples=s
        )
        p_one = export_member(
            one, Path(tmp) / "one.onnx", in_channels=1, num_classes=2, num_samples=1
        )
        sess_many, sess_one = session(p_many), session(p_one)
        t_shared, t_rerun = _side_by_side(
            lambda: sess_many.run(None, feeds),
            lambda: [sess_one.run(None, feeds) for _ in range(s)],
            args.repeat,
        )
        out["shared_backbone"] = {
            "samples": s,
            "one_graph_s": round(t_shared, 4),
            "rerun_per_sample_s": round(t_rerun, 4),
            "ratio": round(t_rerun / t_shared, 2),
        }
        ort_vs_torch = {}
        for au, graph in (
            ("softmax", member_graph(build_network("softmax", cfg), 0, 1)),
            ("ssn", many),
        ):
            path = export_member(
                graph,
                Path(tmp) / f"{au}.onnx",
                in_channels=1,
                num_classes=2,
                num_samples=graph.num_samples,
            )
            sess = session(path)

            def eager(graph: torch.nn.Module = graph) -> object:
                with torch.no_grad():
                    return graph(*tfeeds)

            t_ort, t_torch = _side_by_side(
                lambda sess=sess: sess.run(None, feeds), eager, args.repeat
            )
            ort_vs_torch[au] = {
                "samples": graph.num_samples,
                "onnxruntime_s": round(t_ort, 4),
                "torch_eager_s": round(t_torch, 4),
                "ratio": round(t_torch / t_ort, 2),
            }
        out["ort_vs_torch"] = ort_vs_torch
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
