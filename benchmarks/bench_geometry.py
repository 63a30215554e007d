"""Benchmark the geometry of predict (reorient, resample, windows, stitch, back); prints JSON.

    .venv/bin/python benchmarks/bench_geometry.py [--shape 256 256 128] [--members 2]
        [--width 16] [--patch 64 128 128] [--overlap 0.5] [--threads N]

A 3D bundle (``--members`` small 3D UNets, ``[B,1,D,H,W] -> [B,2,D,H,W]``,
two levels, ``--width`` channels, untrained: speed does not depend on the
weights) is exported with ``uqserve.exporting.export_onnx_members(dims=3)``
with a target spacing of 1.5 x 1.2 x 1.2 mm (z, y, x) and orientation RAS.
The scan is a synthetic volume of ``--shape`` voxels at 0.9 x 0.9 x 1.0 mm
stored LPS, so predict reorients (flip of two axes), resamples (cubic, then
linear back), cuts the model grid into Gaussian-weighted windows and
stitches them.

Prints: the report's timings (``normalize_s`` = normalise + reorient +
resample forward, ``accumulate_s`` = stitch + resample back + decompose on
the input grid, ``model_s``), ``model_only_s`` (the same windows fed
straight to the runtime, nothing else), ``geometry_s`` = normalize_s +
accumulate_s, ``geometry_fraction`` = geometry_s / model_only_s, peak RSS
and the map shapes; each time is the fastest of ``--repeats`` runs (the
machine may be shared). The goal: ``geometry_fraction`` < 0.25 on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _unet3d(width: int, seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv3d(i, o, 3, padding=1), nn.ReLU(), nn.Conv3d(o, o, 3, padding=1), nn.ReLU()
        )

    class UNet3D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = block(1, width)
            self.down = nn.Conv3d(width, 2 * width, 2, stride=2)
            self.mid = block(2 * width, 2 * width)
            self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
            self.dec = block(2 * width, width)
            self.head = nn.Conv3d(width, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e = self.enc(x)
            m = self.mid(self.down(e))
            return self.head(self.dec(torch.cat([e, self.up(m)], dim=1)))

    return UNet3D().eval()


def _export(tmp: Path, members: int, width: int, patch: tuple[int, int, int]) -> Path:
    import torch

    from uqserve.bundle import Normalization
    from uqserve.exporting import export_onnx_members

    files = []
    for m in range(members):
        f = tmp / f"fold{m}.onnx"
        torch.onnx.export(
            _unet3d(width, m), (torch.zeros(1, 1, *patch),), str(f), dynamo=False,
            opset_version=17, input_names=["input"], output_names=["logits"],
            dynamic_axes={n: {0: "b"} for n in ("input", "logits")},
        )  # fmt: skip
        files.append(f)
    out = tmp / "bundle3d"
    export_onnx_members(
        files, out, dims=3, patch=patch, spacing=(1.5, 1.2, 1.2), orientation="RAS",
        normalization=Normalization("zscore"),
    )  # fmt: skip
    return out


def _scan(shape: tuple[int, int, int]) -> Any:
    from uqserve.volumes import Volume

    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    data = 100 * np.exp(-(x**2 + y**2 + z**2) * 3) + rng.normal(0, 5, shape).astype(np.float32)
    affine = np.diag([-0.9, -0.9, 1.0, 1.0])  # LPS, as DICOM stores it
    return Volume(data.astype(np.float32), affine, "synthetic", None, 2)


def _model_only(runtime: Any, vol: Any, batch_size: int, overlap: float) -> float:
    """The same windows through the runtime, nothing else (inputs prepared beforehand)."""
    from uqserve.prediction.frame import plan_frame
    from uqserve.prediction.intensity import normalize_volume
    from uqserve.prediction.windows import iter_tiles, plan_tiles

    man = runtime.bundle.manifest
    frame = plan_frame(vol, man)
    data = frame.to_model(normalize_volume(vol.data, man, [], "x"))
    plan = plan_tiles(frame.model_shape, frame.slice_axis, man, batch_size, overlap)
    batches = list(iter_tiles(plan.working(data), plan, seed=0))
    t0 = time.perf_counter()
    for batch in batches:
        runtime.infer(batch, want_samples=plan.overlapping)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 128))
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 128, 128))
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from uqserve.bundle import load_bundle
    from uqserve.prediction import predict_volume
    from uqserve.runtime.embedded import EmbeddedRuntime

    with tempfile.TemporaryDirectory() as tmp:
        bundle = _export(Path(tmp), args.members, args.width, tuple(args.patch))
        vol = _scan(tuple(args.shape))
        runs: list[dict[str, float]] = []
        model_only = float("inf")
        with EmbeddedRuntime(load_bundle(bundle), device="cpu", threads=args.threads) as rt:
            for _ in range(args.repeats):
                model_only = min(model_only, _model_only(rt, vol, args.batch_size, args.overlap))
                pred = predict_volume(
                    vol, runtime=rt, batch_size=args.batch_size, overlap=args.overlap
                )
                runs.append(dict(pred.report["timings"]))
    t = {k: min(r[k] for r in runs) for k in runs[0]}
    geometry_s = t["normalize_s"] + t["accumulate_s"]
    print(
        json.dumps(
            {
                "shape": list(args.shape),
                "members": args.members,
                "width": args.width,
                "patch": list(args.patch),
                "overlap": args.overlap,
                "geometry": pred.report["geometry"],
                "timings": {k: round(v, 3) for k, v in t.items()},
                "model_only_s": round(model_only, 3),
                "geometry_s": round(geometry_s, 3),
                "geometry_fraction": round(geometry_s / model_only, 4),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "maps_shape": list(pred.tu.shape),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
