"""Benchmark `uqserve predict` against naive clients, side by side in one run; prints JSON.

    .venv/bin/python benchmarks/bench_predict.py [--shape 512 512 64] [--device cuda]
        [--precision fp32|tf32|fp16] [--repeats 1] [--no-torch] [--no-rss]
    .venv/bin/python benchmarks/bench_predict.py --network nnunet-2d --members 5
        --shape 512 512 300 --device cuda [--precision fp16] [--compare-cpu]

``--network nnunet-2d``: nnU-Net's default 2d network (46 M parameters) as
the members, uqserve vs nnU-Net's own predictor on the same scan and device
(see ``benchmarks/_nnunet2d.py``; needs the ``nnunet`` extra). The rest of
this docstring is the default ``--network unet``.

On a synthetic X x Y x Z volume (uqserve.data.make_volume, default 256 x 256 x
64) it measures:

* for each bundle, the whole file pipeline of ``uqserve.predict`` (read a
  .nii.gz, predict, write five gzipped maps and report.json) with its stages
  from report.json (``read_s``, ``normalize_s``, ``model_s``,
  ``accumulate_s``, ``scores_s``, ``write_s``) and ``scans_per_hour``;
* ``model_alone_s``: the same batches through the same runtime with nothing
  else to do (the graphs alone, as fast as they go). ``outside_s`` =
  ``total_s - model_alone_s`` is the time the scan costs beyond its graphs,
  ``outside_fraction`` = ``outside_s / total_s`` and ``total_over_model`` =
  ``total_s / model_alone_s``. (``model_s`` from report.json is the time
  predict waited for the runtime: shorter than the graphs' own time where the
  runtime computes the next batch while predict adds up the last one.)
* ``softmax_ensemble``: uqserve's in-memory pipeline (``predict_volume``) vs
  (a) a naive loop that runs each
  member's ONNX session slice by slice, fetches every output (sample labels
  included) and stacks all member/sample outputs in memory before computing
  the maps with numpy;
* ``ssn_ensemble``: the same, plus (b) eager PyTorch re-running the whole
  network once per sample (what torch code without the in-graph S axis does);
* with ``--scans N``, N copies of the scan through ``uqserve.predict`` with
  the writes of scan i overlapping the prediction of scan i + 1 (the
  default) and without (``pipeline=False``): seconds per scan of each;
* peak RSS of ``predict`` for an SSN bundle with S = 4 vs S = 64, each in its
  own subprocess.

Bundles: the shipped ``softmax-ensemble`` / ``ssn-ensemble`` need trained
checkpoints for (b), so this script builds untrained members from
uqserve.models with fixed seeds (the default ModelConfig, M = 5, S = 16 for
SSN) and exports them with uqserve.exporting into a temp folder; speed does not
depend on the weights. Needs the ``export`` extra (torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_bundle(out: Path, au: str, members: int, samples: int) -> tuple[Path, list[Any]]:
    """Export ``members`` freshly initialised networks as a bundle; return it and the nets."""
    import torch

    from uqserve.bundle import InputSpec, Normalization
    from uqserve.exporting import ExportPlan, export_networks
    from uqserve.models import ModelConfig, build_network

    cfg = ModelConfig(num_samples=samples)
    nets = []
    for m in range(members):
        torch.manual_seed(1000 + m)
        nets.append(build_network(au, cfg).eval())
    plan = ExportPlan(
        name=out.name,
        au=au,
        eu="ensemble",
        num_members=members,
        num_samples=samples,
        classes=("background", "lesion"),
        input=InputSpec(
            tile_size=(128, 128), multiple=cfg.multiple, normalization=Normalization("zscore")
        ),
    )
    export_networks(nets, out, plan, cfg)
    return out, nets


def naive_onnx(bundle_dir: Path, volume: Any, device: str = "cpu") -> float:
    """(a): per member, per slice session runs; stack everything; maps at the end."""
    import onnxruntime as ort

    from uqserve.bundle import load_bundle

    b = load_bundle(bundle_dir)
    x = volume.data
    norm = ((x - x.mean()) / x.std()).astype(np.float32)
    X, Y, Z = x.shape
    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    means, ents, labels = [], [], []
    for m in range(b.manifest.num_members):
        sess = ort.InferenceSession(
            str(b.member_path(m)),
            sess_options=opts,
            providers=["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"],
        )
        mm, ee, ll = [], [], []
        for z in range(Z):
            feeds = {
                "image": norm[None, None, :, :, z],
                "seed": np.zeros(1, np.int64),
                "offset": np.array([[z, 0, 0]], np.int64),
                "valid": np.array([[X, Y]], np.int64),
            }
            mean, ent, _counts, lab = sess.run(None, feeds)
            mm.append(mean[0])
            ee.append(ent[0])
            ll.append(lab[0])
        means.append(np.stack(mm, axis=-1))  # [K, X, Y, Z]
        ents.append(np.stack(ee, axis=-1))
        labels.append(np.stack(ll, axis=-1))  # [S, X, Y, Z]
    p = np.stack(means).astype(np.float64)  # [M, K, X, Y, Z]
    pbar = p.mean(axis=0)
    tu = -(pbar * np.log(np.clip(pbar, 1e-30, None))).sum(axis=0)
    au = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1).mean(axis=0)
    _eu = tu - au
    _aus = np.stack(ents).mean(axis=0)
    _seg = pbar.argmax(axis=0)
    _counts = np.stack([(np.stack(labels) == k).sum(axis=(2, 3, 4)) for k in range(p.shape[1])])
    return time.perf_counter() - t0


def eager_torch(
    nets: list[Any], volume: Any, samples: int, device: str = "cpu", batch: int = 8
) -> float:
    """(b): eager PyTorch, the whole network re-run for every sample."""
    import torch

    x = volume.data
    norm = torch.from_numpy(((x - x.mean()) / x.std()).astype(np.float32))
    slices = norm.permute(2, 0, 1).unsqueeze(1).contiguous().to(device)  # [Z, 1, X, Y]
    nets = [net.to(device) for net in nets]
    t0 = time.perf_counter()
    with torch.inference_mode():
        sums = torch.zeros(2, *slices.shape[2:], slices.shape[0], device=device)
        for net in nets:
            for _s in range(samples):
                for z0 in range(0, slices.shape[0], batch):
                    p = net(slices[z0 : z0 + batch], samples=1)[:, 0]  # [b, K, X, Y]
                    sums[..., z0 : z0 + batch] += p.permute(1, 2, 3, 0)
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0


BUNDLES = ("softmax_ensemble", "ssn_ensemble")
STAGES = ("read_s", "normalize_s", "model_s", "accumulate_s", "scores_s", "write_s")


def uqserve_predict(rt: Any, volume: Any, batch_size: int | None) -> dict[str, float]:
    """In memory, as the naive clients: ``predict_volume`` on an open runtime."""
    from uqserve.prediction import predict_volume

    t0 = time.perf_counter()
    pred = predict_volume(volume, runtime=rt, batch_size=batch_size)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "model_s": pred.report["timings"]["model_s"]}


def model_alone(rt: Any, volume: Any, batch_size: int | None) -> float:
    """Seconds for ``predict_volume``'s batches through ``rt`` with nothing else to do."""
    from uqserve.prediction.geometry import iter_batches, plan_slices
    from uqserve.prediction.intensity import normalization

    man = rt.bundle.manifest
    plan = plan_slices(volume, man, batch_size or rt.preferred_batch_size)
    work = plan.working(volume.data)
    intensity = normalization(work, man, [], volume.source)
    batches = list(iter_batches(work, plan, intensity, 0))
    t0 = time.perf_counter()
    for _ in rt.infer_many(batches):
        pass
    return time.perf_counter() - t0


def uqserve_files(rt: Any, scan: Path, out: Path, batch_size: int | None) -> dict[str, float]:
    """The file pipeline of ``uqserve predict``: per-stage seconds from report.json."""
    from uqserve.prediction import predict

    (res,) = predict([scan], out, runtime=rt, batch_size=batch_size, overwrite=True)
    assert res.report is not None
    t = res.report["timings"]
    stages = {k: float(t.get(k, 0.0)) for k in STAGES}  # type: ignore[misc]
    total = float(t["total_s"])  # type: ignore[typeddict-item]
    return {**stages, "total_s": total}


def _high_water_mib() -> float:
    """This process's peak RSS. Not ``getrusage``: on Linux its ``ru_maxrss`` carries
    the parent's peak across fork + exec, so a child would report the benchmark's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def rss_child(bundle_dir: str, depth: int, batch_size: int | None) -> None:
    """Run in a subprocess: predict once, print peak RSS in MiB."""
    from uqserve.data import make_volume
    from uqserve.prediction import predict_volume

    vol = make_volume(0, shape=(256, 256, depth)).volume
    base = _high_water_mib()
    predict_volume(vol, bundle_dir, batch_size=batch_size)
    print(json.dumps({"peak_rss_mib": _high_water_mib(), "before_mib": base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    ap.add_argument("--depth", type=int, default=64, help="Z of a 256 x 256 x Z volume")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "fp16"))
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument(
        "--batch-size", type=int, default=None, help="slices per call (default: the runtime's)"
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--bundles", nargs="+", choices=BUNDLES, default=list(BUNDLES), help="which to measure"
    )
    ap.add_argument("--no-torch", action="store_true", help="skip (b), eager PyTorch")
    ap.add_argument("--no-naive", action="store_true", help="skip (a), the naive ONNX loop")
    ap.add_argument("--no-rss", action="store_true", help="skip the S = 4 vs 64 peak RSS")
    ap.add_argument("--scans", type=int, default=0, help="also time N scans, pipelined or not")
    ap.add_argument(
        "--rss-child", nargs=3, metavar=("BUNDLE", "DEPTH", "BATCH"), help=argparse.SUPPRESS
    )
    ap.add_argument("--network", default="unet", choices=("unet", "nnunet-2d"))
    ap.add_argument(
        "--reduce", default="auto", choices=("auto", "graph", "host"),
        help="nnunet-2d: where uqserve sums the members (auto: graph on CUDA)",
    )  # fmt: skip
    ap.add_argument("--compare-cpu", action="store_true", help="nnunet-2d: maps vs fp32 on the CPU")
    args = ap.parse_args()
    if args.network == "nnunet-2d":
        from _nnunet2d import run

        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its progress
            result = run(args)
        print(json.dumps(result, indent=2))
        return
    if args.rss_child:
        batch = None if args.rss_child[2] == "auto" else int(args.rss_child[2])
        rss_child(args.rss_child[0], int(args.rss_child[1]), batch)
        return

    from uqserve.data import make_volume
    from uqserve.runtime import open_runtime
    from uqserve.volumes import write_nifti_like

    shape = tuple(args.shape) if args.shape else (256, 256, args.depth)
    volume = make_volume(0, shape=shape).volume
    result: dict[str, Any] = {
        "volume": list(shape),
        "device": args.device,
        "precision": args.precision,
        "threads": len(os.sched_getaffinity(0)),
        "batch_size": args.batch_size or "auto",
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        scan = write_nifti_like(volume.data, volume, t / "scan.nii.gz")
        for name in args.bundles:
            au, samples = ("softmax", 1) if name == "softmax_ensemble" else ("ssn", args.samples)
            bundle, nets = build_bundle(t / name, au, args.members, samples)
            with open_runtime(bundle, device=args.device, precision=args.precision) as rt:
                uqserve_predict(rt, volume, args.batch_size)  # warm-up: allocator, autotuning
                entry = _measure(rt, volume, scan, t / "out", nets if au == "ssn" else None,
                                 samples, args)  # fmt: skip
                if args.scans:
                    entry["per_scan_of_many_s"] = _many(rt, scan, t / f"many-{name}", args)
            result[name] = {"members": args.members, "samples": samples, **entry}
        if not args.no_rss:
            result.update(_rss(t, args))
    print(json.dumps(result, indent=2))


def _measure(
    rt: Any, volume: Any, scan: Path, out: Path, nets: Any, samples: int, args: Any
) -> dict[str, Any]:
    """Best of ``repeats`` for the file pipeline, the in-memory pipeline and the peers."""
    files: dict[str, float] = {}
    best: dict[str, float] = {}
    alone = float("inf")
    for _ in range(args.repeats):
        alone = min(alone, model_alone(rt, volume, args.batch_size))
        run = uqserve_files(rt, scan, out, args.batch_size)
        files = run if not files or run["total_s"] < files["total_s"] else files
        mem = uqserve_predict(rt, volume, args.batch_size)
        cand = {"uqserve_s": mem["wall_s"], "model_in_memory_s": mem["model_s"]}
        if not args.no_naive:
            cand["naive_onnx_s"] = naive_onnx(rt.bundle.path, volume, args.device)
        if nets is not None and not args.no_torch:
            cand["eager_torch_s"] = eager_torch(nets, volume, samples, args.device)
        best = cand if not best or cand["uqserve_s"] < best["uqserve_s"] else best
    outside = files["total_s"] - alone
    entry: dict[str, Any] = {
        "model_alone_s": round(alone, 3),
        "model_s": round(files["model_s"], 3),
        "outside_s": round(outside, 3),
        "outside_fraction": round(outside / files["total_s"], 3),
        "total_over_model": round(files["total_s"] / alone, 3),
        "total_s": round(files["total_s"], 3),
        "scans_per_hour": round(3600 / files["total_s"], 1),
        "stages_s": {k: round(files[k], 3) for k in STAGES},
        **{k: round(v, 3) for k, v in best.items()},
    }
    if "naive_onnx_s" in best:
        entry["speedup_vs_naive_onnx"] = round(best["naive_onnx_s"] / best["uqserve_s"], 2)
    if "eager_torch_s" in best:
        entry["speedup_vs_eager_torch"] = round(best["eager_torch_s"] / best["uqserve_s"], 2)
    return entry


def _many(rt: Any, scan: Path, folder: Path, args: Any) -> dict[str, float]:
    """Seconds per scan over ``args.scans`` copies, pipelined and one after the other."""
    import shutil

    from uqserve.prediction import predict

    folder.mkdir()
    for i in range(args.scans):
        shutil.copyfile(scan, folder / f"scan{i:03d}.nii.gz")
    out: dict[str, float] = {}
    for label, pipeline in (("sequential", False), ("pipelined", True)):
        t0 = time.perf_counter()
        predict([folder], folder.parent / f"{folder.name}-{label}", runtime=rt,
                batch_size=args.batch_size, pipeline=pipeline)  # fmt: skip
        out[label] = round((time.perf_counter() - t0) / args.scans, 3)
    out["ratio_pipelined_vs_sequential"] = round(out["pipelined"] / out["sequential"], 3)
    return out


def _rss(t: Path, args: Any) -> dict[str, Any]:
    """Peak RSS of predict, S = 4 vs S = 64 (same architecture, own subprocess each)."""
    rss = {}
    for s in (4, 64):
        b, _ = build_bundle(t / f"ssn-s{s}", "ssn", 2, s)
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(b), str(args.depth),
             str(args.batch_size or "auto")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        rss[f"S{s}"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return {
        "peak_rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "peak_rss_ratio_S64_over_S4": round(rss["S64"] / rss["S4"], 3),
    }


if __name__ == "__main__":
    main()
