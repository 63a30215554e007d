"""``bench_predict.py --network nnunet-2d``: a 5-fold nnU-Net-sized 2D ensemble, uqserve vs
nnU-Net's own predictor on the same scan, same device, same run.

The member is nnU-Net's default 2d network (``PlainConvUNet`` of
``dynamic_network_architectures``: 8 stages of 32-512 features, two 3 x 3
convolutions per stage, instance norm, leaky ReLU; about 46 M parameters),
the patch set to the scan's in-plane size (512 x 512 for a CT; nnU-Net's
planner picks the same; smaller slices get fewer stages, down to a 4 x 4
bottleneck, as its planner would). nnU-Net plans a tiny synthetic dataset (its
fingerprint and plans files), the 2d configuration is replaced by that
network, and its trainer writes one checkpoint per fold of freshly
initialised networks (speed does not depend on the weights). uqserve
exports the folds (``export_nnunet``: ONNX members in the member contract,
mirroring off); nnU-Net predicts with ``nnUNetPredictor`` (autocast fp16 on
CUDA, every fold, no mirroring, all on the device).

Reported: ``model_alone_s`` (uqserve's member graphs over the scan's
slices, nothing else), ``total_s`` (``uqserve.predict``: read, predict,
scores, five maps written) and its stages, ``total_over_model``,
``scans_per_hour``; nnU-Net's ``model_s`` (logits of every fold from its
preprocessed array) and ``total_s`` (file in, segmentation out), and the
ratios; the peak device memory of each (CUDA: sampled from
``cudaMemGetInfo``, so onnxruntime's arena counts; CPU: peak RSS). With
``--compare-cpu`` uqserve's maps are also predicted by fp32 on the CPU and
compared (max |diff| of TU/AU/EU, share of equal labels).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: nnU-Net's default 2d architecture for a 512 x 512 patch (its planner's output for CT).
ARCH_2D: dict[str, Any] = {
    "n_stages": 8,
    "features_per_stage": [32, 64, 128, 256, 512, 512, 512, 512],
    "kernel_sizes": [[3, 3]] * 8,
    "strides": [[1, 1]] + [[2, 2]] * 7,
    "n_conv_per_stage": [2] * 8,
    "n_conv_per_stage_decoder": [2] * 7,
}
SPACING = (0.8, 0.8, 3.0)


def arch_2d(side: int) -> dict[str, Any]:
    """``ARCH_2D``, with fewer stages for slices under 512 (as nnU-Net's planner: it
    stops halving at a 4 x 4 bottleneck); the full network from 512 up."""
    n = 8
    while n > 2 and side / 2 ** (n - 1) < 4:
        n -= 1
    arch = {k: v[:n] if isinstance(v, list) else v for k, v in ARCH_2D.items()}
    arch["n_stages"] = n
    arch["n_conv_per_stage_decoder"] = ARCH_2D["n_conv_per_stage_decoder"][: n - 1]
    return arch  # mm, [X, Y, Z]: slices along Z for nnU-Net and uqserve alike


def _raw_dataset(root: Path, name: str, shape: tuple[int, int, int]) -> None:
    """Two small CT-like training cases at ``SPACING`` (only planned, never trained)."""
    import nibabel as nib

    raw = root / "raw" / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(991)
    affine = np.diag([*SPACING, 1.0])
    small = (min(shape[0], 64), min(shape[1], 64), min(shape[2], 8))
    for i in range(2):
        image = rng.normal(40.0, 300.0, size=small).astype(np.float32)
        label = (image > 100).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), str(raw / "imagesTr" / f"c_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(raw / "labelsTr" / f"c_{i:03d}.nii.gz"))
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))


def _plans(root: Path, name: str, ident: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """nnU-Net's plans of the dataset, 2d configuration = ``ARCH_2D`` on the scan's slices."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([ident], num_processes=1, verbose=False, show_progress_bar=False)
    plans_name = plan_experiments([ident])
    path = root / "preprocessed" / name / f"{plans_name}.json"
    plans: dict[str, Any] = json.loads(path.read_text())
    conf = plans["configurations"]["2d"]
    # nnU-Net's arrays are [Z, Y, X]: a 2d patch is (Y, X) of a slice.
    conf["patch_size"] = [shape[1], shape[0]]
    conf["spacing"] = [SPACING[1], SPACING[0]]
    conf["batch_size"] = 12
    conf["architecture"]["arch_kwargs"].update(arch_2d(min(shape[:2])))
    path.write_text(json.dumps(plans, indent=2))
    # the trainer that writes the checkpoints looks for the preprocessed cases
    preprocess([ident], plans_name, configurations=("2d",), num_processes=(1,), verbose=False)
    return plans


@contextlib.contextmanager
def peak_device_mib(device: str) -> Iterator[dict[str, float]]:
    """The peak memory while the block runs: device memory in use (CUDA, sampled every
    5 ms from ``cudaMemGetInfo``, every allocator counts), else this process's peak RSS."""
    out: dict[str, float] = {}
    if device != "cuda":
        yield out
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return
    import torch

    free0, total = torch.cuda.mem_get_info()
    peak = [total - free0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.005):
            free, _ = torch.cuda.mem_get_info()
            peak[0] = max(peak[0], total - free)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_gpu_mib"] = peak[0] / 2**20
        out["gpu_mib_before"] = (total - free0) / 2**20


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def nnunet_side(model_dir: Path, scan: Path, out: Path, folds: tuple[int, ...], device: str):
    """nnU-Net's predictor: model time (every fold's logits from its preprocessed array)
    and the file pipeline (scan in, segmentation out); warm-up first."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    dev = torch.device(device)
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
        perform_everything_on_device=device == "cuda", device=dev, verbose=False,
        verbose_preprocessing=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(model_dir), folds, "checkpoint_final.pth")
    pre = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = pre.run_case(
        [str(scan)], None, predictor.plans_manager, predictor.configuration_manager,
        predictor.dataset_json,
    )  # fmt: skip
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))

    def logits() -> Any:
        got = predictor.predict_logits_from_preprocessed_data(tensor)
        if device == "cuda":
            torch.cuda.synchronize()
        return got

    logits()  # warm-up: cuDNN autotuning, allocator
    with peak_device_mib(device) as mem:
        model_s, _ = _timed(logits)
        out.mkdir(parents=True, exist_ok=True)
        total_s, _ = _timed(
            lambda: predictor.predict_from_files_sequential(
                [[str(scan)]], [str(out / "case")], save_probabilities=False
            )
        )
    return {"model_s": model_s, "total_s": total_s, "slices": int(tensor.shape[1]), **mem}


def uqserve_side(bundle: Path, volume: Any, scan: Path, out: Path, args: Any) -> dict[str, Any]:
    """uqserve: the graphs alone, then the whole file pipeline, on one open runtime."""
    from bench_predict import model_alone, uqserve_files

    from uqserve.runtime import open_runtime

    rt = open_runtime(bundle, device=args.device, precision=args.precision, reduce=args.reduce)
    with rt:
        model_alone(rt, volume, args.batch_size)  # warm-up: allocator, autotuning
        with peak_device_mib(args.device) as mem:
            alone = min(model_alone(rt, volume, args.batch_size) for _ in range(args.repeats))
            runs = [uqserve_files(rt, scan, out, args.batch_size) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["total_s"])
    total = best.pop("total_s")
    return {
        "model_alone_s": alone,
        "total_s": total,
        "total_over_model": total / alone,
        "stages": best,
        "scans_per_hour": 3600.0 / total,
        "reduce": "graph" if rt.reduces else "host",
        **mem,
    }


def compare_cpu(bundle: Path, volume: Any, args: Any) -> dict[str, Any]:
    """uqserve's maps on ``args.device``/``args.precision`` vs fp32 on the CPU."""
    from uqserve.prediction import Predictor, RuntimeOptions

    maps: list[Any] = []
    for opts in (RuntimeOptions(args.device, args.precision), RuntimeOptions("cpu", "fp32")):
        with Predictor(bundle, opts, exact_scores=True) as p:
            maps.append(p.predict(volume))
    dev, cpu = maps
    diff = {k: float(np.abs(getattr(dev, k) - getattr(cpu, k)).max()) for k in ("tu", "au", "eu")}
    return {"max_abs_diff": diff, "labels_equal": float(np.mean(dev.seg == cpu.seg))}


def parameters(plans: dict[str, Any]) -> int:
    """Parameters of one member: nnU-Net's 2d network built from the plans (each tensor
    once; its state dict lists the encoder twice, the decoder holds a reference)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    conf = PlansManager(plans).get_configuration("2d")
    net = get_network_from_plans(
        conf.network_arch_class_name, conf.network_arch_init_kwargs,
        conf.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=False,
    )  # fmt: skip
    return int(sum(p.numel() for p in net.parameters()))


def run(args: Any) -> dict[str, Any]:
    """The whole comparison; a JSON-able result."""
    shape = tuple(args.shape) if args.shape else (512, 512, 300)
    folds = tuple(range(args.members))
    with tempfile.TemporaryDirectory(prefix="bench_nnunet2d_") as tmp:
        root = Path(tmp)
        for var in ("raw", "preprocessed", "results"):
            os.environ[f"nnUNet_{var}"] = str(root / var)
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        sys.path.insert(0, str(ROOT))
        from tests._nnunet_reference import write_checkpoints
        from uqserve.data import make_volume
        from uqserve.exporting import export_nnunet
        from uqserve.volumes import write_nifti_like

        name, ident = "Dataset991_bench2d", 991
        _raw_dataset(root, name, shape)  # type: ignore[arg-type]
        plans = _plans(root, name, ident, shape)  # type: ignore[arg-type]
        model_dir = write_checkpoints(root, name, plans, "2d", folds)
        volume = make_volume(0, shape=shape, spacing=SPACING).volume
        scan = write_nifti_like(volume.data, volume, root / "case_0000.nii.gz")
        export_s, _ = _timed(
            lambda: export_nnunet(model_dir, root / "bundle", folds=[str(f) for f in folds])
        )
        result: dict[str, Any] = {
            "network": "nnunet-2d",
            "parameters_per_member": parameters(plans),
            "members": args.members,
            "shape": list(shape),
            "device": args.device,
            "precision": args.precision,
            "export_s": export_s,
            "uqserve": uqserve_side(root / "bundle", volume, scan, root / "out", args),
            "nnunet": nnunet_side(model_dir, scan, root / "nnunet-out", folds, args.device),
        }
        if args.compare_cpu:
            result["vs_cpu_fp32"] = compare_cpu(root / "bundle", volume, args)
    uq, nn = result["uqserve"], result["nnunet"]
    result.update(_headline(uq, nn))
    return result


def _headline(uq: dict[str, Any], nn: dict[str, Any]) -> dict[str, Any]:
    """The issue's numbers at the top level, and the side-by-side ratios."""
    return {
        "model_alone_s": uq["model_alone_s"],
        "total_s": uq["total_s"],
        "total_over_model": uq["total_over_model"],
        "stages": uq["stages"],
        "scans_per_hour": uq["scans_per_hour"],
        "peak_gpu_mib": uq.get("peak_gpu_mib"),
        "model_over_nnunet_model": uq["model_alone_s"] / nn["model_s"],
        "total_over_nnunet_total": uq["total_s"] / nn["total_s"],
    }
