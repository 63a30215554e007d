"""What each ``--precision`` changes, per shipped bundle, against the CPU's float32; prints JSON.

    .venv/bin/python benchmarks/bench_precision.py --device cuda [--scan examples/example.nii.gz]
        [--shape 512 512 64] [--repeats 3]

For each shipped bundle the scan (default: the shipped example; ``--shape``:
a synthetic ``uqserve.data.make_volume`` volume instead) is predicted once on
the CPU in float32 (the reference answer) and then on ``--device`` with each
precision (``fp32``, ``tf32``, ``fp16``). For each it reports the largest
absolute change of p̄, TU, AU and EU against the reference, the share of
segmentation voxels that flipped, and the median seconds in the model graphs
(``model_s``) and in all of ``predict_volume`` over ``--repeats`` runs after
one warm-up. A precision the device cannot run (tf32/fp16 on a CPU) is
reported with its error instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAPS = ("prob", "tu", "au", "eu")


def compare(got: Any, ref: Any) -> dict[str, float]:
    out = {
        f"max_abs_diff_{m}": float(np.abs(getattr(got, m) - getattr(ref, m)).max()) for m in MAPS
    }
    out["seg_flipped_fraction"] = float(np.mean(got.seg != ref.seg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--scan", type=Path, default=ROOT / "examples" / "example.nii.gz")
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from uqserve.bundle import shipped_bundles
    from uqserve.data import make_volume
    from uqserve.errors import UsageError
    from uqserve.prediction import predict_volume
    from uqserve.runtime import open_runtime
    from uqserve.volumes import read_volume

    volume = (
        make_volume(0, shape=tuple(args.shape)).volume if args.shape else read_volume(args.scan)
    )
    result: dict[str, Any] = {"scan": list(volume.shape), "device": args.device}
    for name in shipped_bundles():
        with open_runtime(name, device="cpu") as cpu:
            ref = predict_volume(volume, runtime=cpu)
        rows: dict[str, Any] = {}
        for precision in ("fp32", "tf32", "fp16"):
            try:
                rt = open_runtime(name, device=args.device, precision=precision)
            except UsageError as exc:
                rows[precision] = {"error": str(exc)}
                continue
            with rt:
                got = predict_volume(volume, runtime=rt)  # warm-up: sessions, cuDNN
                model, wall = [], []
                for _ in range(args.repeats):
                    got = predict_volume(volume, runtime=rt)
                    model.append(got.report["timings"]["model_s"])
                    wall.append(got.report["timings"]["predict_s"])
            rows[precision] = {
                **compare(got, ref),
                "model_s": round(statistics.median(model), 4),
                "predict_s": round(statistics.median(wall), 4),
            }
        result[name] = rows
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
