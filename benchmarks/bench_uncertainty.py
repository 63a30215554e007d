"""Streaming Accumulator vs batch ``decompose``: throughput and peak memory, side by side.

Run:  .venv/bin/python benchmarks/bench_uncertainty.py  [--shape 256 256 64 --members 5]

For K = 2 and K = 4, M softmax members' p̄_m for one volume are generated
first (not measured). Then

* the Accumulator receives them slab by slab (``--slab`` indices along the
  first spatial axis, members in turn for each slab, as predict sends them;
  then again along the last axis, where each slab is a strided view);
* ``decompose`` receives the same data as one ``[M, 1, K, *sp]`` array (a view).

Printed as JSON: wall time (best of ``--repeat``), voxel-member updates per
second, peak memory allocated during the call (tracemalloc; numpy reports its
buffers to it) beyond the inputs, that peak relative to the bytes of the output
maps, and the ratios decompose / accumulator. The two results are also
compared (max abs difference), so the figures belong to a correct run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from uqserve.uncertainty import Accumulator, Decomposition, decompose


def member_means(m: int, k: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """``[M, K, *sp]`` float32 softmax outputs with members that mostly agree."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((k, *shape), dtype=np.float32) * 3
    out = np.empty((m, k, *shape), np.float32)
    for i in range(m):
        logits = shared + rng.standard_normal((k, *shape), dtype=np.float32)
        logits -= logits.max(axis=0)
        np.exp(logits, out=out[i])
        out[i] /= out[i].sum(axis=0)
    return out


def run_accumulator(
    means: np.ndarray, slab: int, axis: int, release: bool = False
) -> Decomposition:
    """Members in turn for each slab of ``slab`` indices along spatial ``axis``."""
    m, k, *shape = means.shape
    acc = Accumulator(k, tuple(shape))
    for z0 in range(0, shape[axis], slab):
        where = (slice(None),) * axis + (slice(z0, min(z0 + slab, shape[axis])),)
        for i in range(m):
            acc.add(means[(i, slice(None), *where)], where=where)
    return acc.result(release=release)


def run_decompose(means: np.ndarray) -> Decomposition:
    return decompose(means[:, None])


def output_bytes(d: Decomposition) -> int:
    arrays = [d.mean, d.tu, d.au, d.eu, d.au_sample, d.au_latent, d.member_foreground]
    return sum(a.nbytes for a in arrays if a is not None)


def measure(fn: Callable[[], Decomposition], repeat: int) -> dict[str, Any]:
    times: list[float] = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    out_b = output_bytes(result)
    return {
        "seconds": min(times) if times else None,
        "peak_bytes": peak,
        "output_bytes": out_b,
        "extra_bytes": peak - out_b,
        "extra_over_output": (peak - out_b) / out_b,
        "result": result,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[256, 256, 64])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--slab", type=int, default=16, help="indices per slab along the slab axis")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.slab < 1 or args.members < 1:
        ap.error("--repeat, --slab and --members must be >= 1")
    shape = tuple(args.shape)
    voxels = int(np.prod(shape))
    rows = []
    for k in args.classes:
        means = member_means(args.members, k, shape, args.seed)
        last = len(shape) - 1
        acc = measure(partial(run_accumulator, means, args.slab, 0), args.repeat)
        acc_last = measure(partial(run_accumulator, means, args.slab, last), args.repeat)
        # memory only: result(release=True) reuses the running sums for the maps
        acc_release = measure(partial(run_accumulator, means, args.slab, 0, True), 0)
        dec = measure(partial(run_decompose, means), args.repeat)
        rd = dec.pop("result")
        updates = voxels * args.members
        dec["updates_per_s"] = updates / dec["seconds"]
        row: dict[str, Any] = {"num_classes": k, "input_bytes": int(means.nbytes), "decompose": dec}
        for name, r in (
            ("accumulator_slabs_first_axis", acc),
            ("accumulator_slabs_last_axis", acc_last),
            ("accumulator_slabs_first_axis_release", acc_release),
        ):
            ra = r.pop("result")
            if r["seconds"] is not None:
                r["updates_per_s"] = updates / r["seconds"]
                r["time_ratio_decompose_over_accumulator"] = dec["seconds"] / r["seconds"]
            r["max_abs_difference_to_decompose"] = max(
                float(np.abs(getattr(ra, f) - getattr(rd, f)).max())
                for f in ("mean", "tu", "au", "eu", "au_sample", "au_latent")
            )
            r["foreground_equal"] = bool(np.array_equal(ra.member_foreground, rd.member_foreground))
            r["memory_ratio_decompose_over_accumulator"] = dec["peak_bytes"] / r["peak_bytes"]
            row[name] = r
        rows.append(row)
        del rd
    report = {
        "benchmark": "uncertainty.Accumulator vs uncertainty.decompose",
        "command": "python benchmarks/bench_uncertainty.py " + " ".join(argv or sys.argv[1:]),
        "shape": list(shape),
        "voxels": voxels,
        "members": args.members,
        "slab_slices": args.slab,
        "repeat": args.repeat,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
