"""Compressors for the output maps, measured on real maps; prints JSON.

    .venv/bin/python benchmarks/bench_gzip.py [--shape 256 256 32] [--repeats 3]

Predicts a synthetic volume (uqserve.data.make_volume) with the shipped
softmax-ensemble, then gzips the TU, EU and p̄ maps' raw float32 bytes with
zlib (levels 1 and 6; nibabel writes level 1), ISA-L's igzip (``isal``,
levels 1-3) and zlib-ng (``zlib_ng``, when installed), reporting seconds and
compressed size / raw size per map (best of ``--repeats``). Finally it times
writing the five output files one after the other vs in parallel threads
(``uqserve.volumes.write_niftis_like``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compressors() -> dict[str, Callable[[bytes], bytes]]:
    from isal import igzip

    out: dict[str, Callable[[bytes], bytes]] = {
        "zlib_1": lambda b: gzip.compress(b, 1, mtime=0),
        "zlib_6": lambda b: gzip.compress(b, 6, mtime=0),
        **{f"isal_{lv}": (lambda b, lv=lv: igzip.compress(b, lv, mtime=0)) for lv in (1, 2, 3)},
    }
    try:
        from zlib_ng import gzip_ng

        out["zlib_ng_1"] = lambda b: gzip_ng.compress(b, 1, mtime=0)
    except ImportError:
        pass
    return out


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 32))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from uqserve.data import make_volume
    from uqserve.prediction import predict_volume
    from uqserve.volumes import write_nifti_like, write_niftis_like

    volume = make_volume(0, shape=tuple(args.shape)).volume
    pred = predict_volume(volume, "softmax-ensemble")
    maps = {"tu": pred.tu, "eu": pred.eu, "prob": np.ascontiguousarray(pred.prob[1])}
    result: dict[str, Any] = {"shape": list(args.shape), "threads": len(os.sched_getaffinity(0))}
    for name, arr in maps.items():
        raw = np.asfortranarray(arr, dtype=np.float32).tobytes(order="F")
        row = {}
        for label, fn in compressors().items():
            seconds, blob = best_of(lambda fn=fn, raw=raw: fn(raw), args.repeats)
            row[label] = {"s": round(seconds, 4), "ratio": round(len(blob) / len(raw), 4)}
        result[name] = row
    items = [
        (pred.seg, "seg.nii.gz"),
        (maps["prob"], "prob.nii.gz"),
        *((getattr(pred, k), f"{k}.nii.gz") for k in ("tu", "au", "eu")),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = [(a, d / n) for a, n in items]
        for level in (1, 6):
            serial, _ = best_of(
                lambda level=level: [
                    write_nifti_like(a, volume, p, compression_level=level) for a, p in files
                ],
                args.repeats,
            )
            parallel, _ = best_of(
                lambda level=level: write_niftis_like(files, volume, compression_level=level),
                args.repeats,
            )
            result[f"write_5_files_level_{level}"] = {
                "serial_s": round(serial, 4),
                "threads_s": round(parallel, 4),
                "bytes": sum(p.stat().st_size for _, p in files),
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
