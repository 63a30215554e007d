"""The AU x EU study: train, export, calibrate and evaluate all 12 combinations.

    .venv/bin/python benchmarks/study.py --scale tiny   # ~30 min on 2 CPU cores
    .venv/bin/python benchmarks/study.py --scale small  # ~2 h on 2 CPU cores (estimate)

Writes ``results/study.md`` (the table, the comparison with the paper's
findings, the scale), ``results/study.json``, ``results/study.csv`` and
``results/figures/*.png``. Checkpoints, bundles and the raw evaluation go to
``--work`` (default ``build/study-<scale>``); a finished combination is not
retrained when the script is run again (delete ``--work`` to start afresh).
Prints one JSON object with the timings at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("noise", "blur", "contrast", "jpeg")  # the paper's four corruptions

# Everything that defines a scale, in one place (quoted in results/study.md).
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {
        "train": {
            "steps": 400, "batch_size": 8, "size": (32, 32), "image_size": 32, "num_images": 192,
            "num_members": 3, "num_masks": 4, "ambiguity": "high", "validate": 16,
        },
        "model": {"width": 8, "depth": 2, "num_samples": 4, "diffusion_steps": 4},
        "calibrate": {"n_test": 6, "n_val": 12, "n_ood": 4, "shifts": PAPER, "severities": (1.0,)},
        "evaluate": {"n_test": 12, "n_val": 12, "n_ood": 6, "severities": (0.5, 1.0)},
    },
    "small": {
        "train": {
            "steps": 1000, "batch_size": 8, "size": (64, 64), "image_size": 64, "num_images": 512,
            "num_members": 3, "num_masks": 6, "ambiguity": "high", "validate": 32,
        },
        "model": {"width": 16, "depth": 3, "num_samples": 8, "diffusion_steps": 4},
        "calibrate": {"n_test": 12, "n_val": 24, "n_ood": 8, "shifts": PAPER, "severities": (1.0,)},
        "evaluate": {"n_test": 32, "n_val": 32, "n_ood": 16, "severities": (0.5, 1.0)},
    },
    # Seconds: checks that the script runs end to end; its numbers mean nothing.
    "smoke": {
        "train": {
            "steps": 10, "batch_size": 4, "size": (16, 16), "image_size": 16, "num_images": 16,
            "num_members": 2, "num_masks": 2, "ambiguity": "high", "validate": 0,
        },
        "model": {"width": 4, "depth": 1, "num_samples": 2, "diffusion_steps": 2},
        "calibrate": {"n_test": 2, "n_val": 4, "n_ood": 2, "shifts": ("noise",),
                      "severities": (1.0,)},
        "evaluate": {"n_test": 3, "n_val": 4, "n_ood": 2, "severities": (1.0,)},
    },
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_bundle(combination: str, scale: str, work: str, seed: int) -> dict[str, Any]:
    """Train + export + calibrate one combination (in a worker process); returns timings."""
    import torch

    torch.set_num_threads(1)
    from uqserve.evaluate import calibrate
    from uqserve.exporting import export_checkpoints
    from uqserve.models import ModelConfig
    from uqserve.training import TrainConfig, train

    cfg = SCALES[scale]
    root = Path(work)
    bundle = root / "bundles" / combination
    if (bundle / "manifest.json").is_file() and (bundle / ".calibrated").is_file():
        return {"combination": combination, "reused": True}
    t0 = time.perf_counter()
    ckpt = train(
        combination,
        root / "checkpoints" / combination,
        config=TrainConfig(**cfg["train"], threads=1),
        model_config=ModelConfig(**cfg["model"]),
        seed=seed,
        overwrite=True,
    )
    t1 = time.perf_counter()
    export_checkpoints(ckpt, bundle, name=combination, calibrate=False, overwrite=True)
    t2 = time.perf_counter()
    calibrate(bundle, "synthetic", device="cpu", seed=seed, **cfg["calibrate"])
    (bundle / ".calibrated").write_text("")
    t3 = time.perf_counter()
    train_val = json.loads((ckpt / "config.json").read_text()).get("validation", {})
    return {
        "combination": combination,
        "train_s": round(t1 - t0, 1),
        "export_s": round(t2 - t1, 1),
        "calibrate_s": round(t3 - t2, 1),
        "train_dice_vs_majority": train_val.get("dice_vs_majority_mean"),
    }


# ------------------------------------------------------------------------ the findings


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _f(v: float | None, d: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def findings(rows: list[dict[str, Any]], margin: float = 0.03) -> list[str]:
    """One sentence per finding of the paper about the AU x EU grid: agree, differ, inconclusive.

    ``margin``: differences smaller than this are called inconclusive (one
    seed, small test sets).
    """
    by = {r["combination"]: r for r in rows}
    eu_of = {c: c.split("-")[1] for c in by}
    au_of = {c: c.split("-")[0] for c in by}

    def group(key: str, pred: Any) -> float | None:
        return _mean([r.get(key) for c, r in by.items() if pred(c)])

    def verdict(diff: float | None) -> str:
        if diff is None:
            return "inconclusive"
        return "agree" if diff > margin else ("differ" if diff < -margin else "inconclusive")

    out = []
    # 1. Ensembles: least entangled for OOD and best OOD detection.
    ens_d = group("delta_ood", lambda c: eu_of[c] == "ensemble")
    oth_d = group("delta_ood", lambda c: eu_of[c] != "ensemble" and c != "softmax-none")
    ens_a = group("auroc_eu_mean", lambda c: eu_of[c] == "ensemble")
    oth_a = group("auroc_eu_mean", lambda c: eu_of[c] != "ensemble" and c != "softmax-none")
    d = None if ens_d is None or oth_d is None else ens_d - oth_d
    a = None if ens_a is None or oth_a is None else ens_a - oth_a
    v = verdict(None if d is None or a is None else min(d, a))
    out.append(
        f"**OOD detection — ensembles least entangled and best ({v}).** Ensemble rows: mean Δ OOD "
        f"{_f(ens_d)}, mean OOD AUROC of EU {_f(ens_a)}; the other rows with an EU signal: "
        f"{_f(oth_d)} and {_f(oth_a)}."
    )
    # 2. Ambiguity and calibration: softmax/SSN models do well.
    soft = group("ncc_au", lambda c: au_of[c] in ("softmax", "ssn"))
    rest = group("ncc_au", lambda c: au_of[c] not in ("softmax", "ssn"))
    ace_s = group("ace_tu", lambda c: au_of[c] in ("softmax", "ssn"))
    ace_r = group("ace_tu", lambda c: au_of[c] not in ("softmax", "ssn"))
    dn = None if soft is None or rest is None else soft - rest
    dc = None if ace_s is None or ace_r is None else ace_r - ace_s
    v = verdict(None if dn is None or dc is None else (dn if abs(dn) > abs(dc) else dc))
    if dn is not None and dc is not None and (dn > margin) != (dc > margin):
        v = "inconclusive"
    out.append(
        f"**Ambiguity and calibration — softmax/SSN models do well ({v}).** Softmax/SSN rows: mean "
        f"NCC(AU) {_f(soft)}, mean ACE(TU) {_f(ace_s, 3)}; PUNet/diffusion rows: {_f(rest)} and "
        f"{_f(ace_r, 3)} (higher NCC and lower ACE are better)."
    )

    # 3. PUNets less entangled for ambiguity and calibration.
    def is_punet(c: str) -> bool:
        return au_of[c] == "punet"

    def other(c: str) -> bool:
        return au_of[c] != "punet" and c != "softmax-none"

    pun = _mean([group("delta_ambiguity", is_punet), group("delta_calibration", is_punet)])
    oth = _mean([group("delta_ambiguity", other), group("delta_calibration", other)])
    v = verdict(None if pun is None or oth is None else pun - oth)
    out.append(
        f"**Probabilistic UNets less entangled ({v}).** "
        f"PUNet rows: mean of Δ ambiguity and Δ calibration {_f(pun)}; other rows {_f(oth)}."
    )
    # 4. Softmax ensemble does well on every task.
    se = by.get("softmax-ensemble")
    if se is not None:
        ranks = {}
        for key, higher in (
            ("dice", True),
            ("ged2", False),
            ("auroc_eu_mean", True),
            ("delta_mean", True),
        ):
            vals = [(r.get(key), c) for c, r in by.items() if r.get(key) is not None]
            vals.sort(key=lambda x: -x[0] if higher else x[0])
            ranks[key] = next(
                (i + 1 for i, (_, c) in enumerate(vals) if c == "softmax-ensemble"), None
            )
        n = len(by)
        top = [r for r in ranks.values() if r is not None]
        v = (
            "agree"
            if top and max(top) <= max(3, n // 4)
            else ("differ" if top and min(top) > n // 2 else "inconclusive")
        )
        out.append(
            f"**A softmax ensemble does well on every task ({v}).** Its rank among {n} rows: Dice "
            f"{ranks['dice']}, GED² {ranks['ged2']}, OOD AUROC of EU {ranks['auroc_eu_mean']}, "
            f"mean Δ {ranks['delta_mean']}."
        )
    # 5. "No EU" rows often have Δ < 0.
    none_rows = [r for c, r in by.items() if eu_of[c] == "none" and c != "softmax-none"]
    neg = [r for r in none_rows for k in ("delta_ood", "delta_ambiguity", "delta_calibration")
           if r.get(k) is not None and r[k] < 0]  # fmt: skip
    total = sum(1 for r in none_rows for k in ("delta_ood", "delta_ambiguity", "delta_calibration")
                if r.get(k) is not None)  # fmt: skip
    frac = len(neg) / total if total else None
    v = "inconclusive" if frac is None else ("agree" if frac >= 0.25 else "differ")
    out.append(
        f"**'No EU' rows (paper convention) often have Δ < 0 ({v}).** {len(neg)} of {total} Δ "
        f"scores of the {len(none_rows)} AU-only rows with samples are negative."
    )
    # 6. The modest bar: OOD AUROC of EU about 0.55-0.60 on LIDC's corruptions.
    paper_shifts = ("noise", "blur", "contrast", "jpeg")
    vals = [
        r.get(f"auroc_eu_{s}") for c, r in by.items() if c != "softmax-none" for s in paper_shifts
    ]
    m = _mean(vals)
    v = "inconclusive" if m is None else ("agree" if 0.5 <= m <= 0.7 else "differ")
    out.append(
        "**OOD AUROC of EU on the paper's four corruptions is modest, about 0.55-0.60 on LIDC "
        f"({v}).** "
        f"Ours, averaged over rows with an EU signal and the four corruptions: {_f(m)}."
    )
    return out


# ----------------------------------------------------------------------------- report


def write_study(
    results: dict[str, Any], scale: str, timings: dict[str, Any], out: Path, eval_dir: Path
) -> None:
    from uqserve.evaluate import markdown_table, summary_row

    rows = []
    for b in results["bundles"]:
        row = summary_row(b)
        for m in ("eu", "au"):
            v = [
                x
                for k, x in row.items()
                if k.startswith(f"auroc_{m}_") and k != f"auroc_{m}_all" and x is not None
            ]
            row[f"auroc_{m}_mean"] = sum(v) / len(v) if v else None
        rows.append(row)
    figs = out / "figures"
    if figs.exists():
        shutil.rmtree(figs)
    figs.mkdir(parents=True)
    src = eval_dir / "figures"
    keep = ["summary.png"]
    for name in ("softmax-ensemble", "ssn-none", "punet-ensemble"):
        keep += [f"{name}_{k}.png" for k in ("au_eu", "ood_hist", "reliability", "samples")]
    for f in keep:
        if (src / f).is_file():
            shutil.copy(src / f, figs / f)
    shutil.copy(eval_dir / "results.json", out / "study.json")
    shutil.copy(eval_dir / "results.csv", out / "study.csv")
    cfg = SCALES[scale]
    wall = timings["total_s"]
    lines = [
        f"# The AU x EU study (scale: {scale})",
        "",
        f"Produced by `.venv/bin/python benchmarks/study.py --scale {scale}` in "
        f"{wall / 60:.0f} min wall time on a 2-core CPU machine shared with other work "
        f"(uqserve {results['uqserve_version']}, "
        f"{results['created']}). **This is the `{scale}` scale: small networks trained briefly on "
        "synthetic data, one seed, small test sets. It checks that the whole grid runs and shows "
        "trends; it is not a replication of the paper's numbers.**",
        "",
        "## Scale",
        "",
        f"- training (per network): `{json.dumps(cfg['train'])}`",
        f"- model: `{json.dumps(cfg['model'])}`",
        f"- calibrate (validation data, `uqserve calibrate`): `{json.dumps(cfg['calibrate'])}`",
        f"- evaluate (`uqserve evaluate`): `{json.dumps(cfg['evaluate'])}`, all shifts "
        f"({', '.join(results['data']['shifts'])}), image size {results['data']['size'][0]}",
        "- ensembles: `num_members` independently trained networks; MC dropout: `num_masks` frozen "
        "masks of one network; AU samples per member: `num_samples` (softmax: 1).",
        "",
        "## Results",
        "",
        markdown_table(results),
        "The GED² column is the literature's (d = 1 - IoU over all samples); `study.json` also "
        "has the paper's variant (`ged2_paper`), FPR at 95 % TPR, ACE of AU and EU, NCC of EU "
        "and every number "
        "per set, split and shift.",
        "",
        "![Δ scores and OOD AUROC per combination](figures/summary.png)",
        "",
        "## Compared with the paper's findings",
        "",
        "Verdicts use a margin of 0.03: smaller differences are called inconclusive (one seed).",
        *_training_caveat(timings),
        "",
        *[f"- {s}" for s in findings(rows)],
        "",
        "## Figures",
        "",
        "Per-bundle figures for softmax-ensemble, ssn-none (paper convention) and punet-ensemble: "
        "reliability diagram, image-level AU vs EU coloured by set, OOD histograms with the "
        "threshold, samples vs annotators.",
        "",
        *[f"![{f}](figures/{f})" for f in keep[1:] if (figs / f).is_file()],
        "",
        "## Timings (seconds)",
        "",
        "```json",
        json.dumps(timings, indent=1),
        "```",
        "",
    ]
    (out / "study.md").write_text("\n".join(lines))


def _training_caveat(timings: dict[str, Any], floor: float = 0.3) -> list[str]:
    """Name the combinations whose training did not converge at this scale (Dice vs majority)."""
    dice = {
        c: t.get("train_dice_vs_majority")
        for c, t in timings.get("combinations", {}).items()
        if t.get("train_dice_vs_majority") is not None
    }
    weak = sorted(c for c, d in dice.items() if d < floor)
    if not weak:
        return []
    listed = ", ".join(f"{c} {dice[c]:.2f}" for c in weak)
    return [
        "",
        f"Caveat: at this scale some networks did not learn to segment (held-out Dice against "
        f"the annotators' majority vote after training, below {floor}: {listed}). Their rows "
        "measure an under-trained model, so findings that rest on them are weak; the `small` "
        "scale trains longer.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument(
        "--jobs", type=int, default=1, help="combinations trained in parallel (1 thread each)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--combinations", nargs="*", default=None, help="a subset (default: all 12)")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite study.md from the last run's results in --work (no training or evaluation)",
    )
    args = ap.parse_args()
    from uqserve.evaluate import evaluate
    from uqserve.models import COMBINATIONS

    combos = list(args.combinations or COMBINATIONS)
    work = args.work or ROOT / "build" / f"study-{args.scale}"
    if args.report_only:
        eval_dir = work / "evaluation"
        results = json.loads((eval_dir / "results.json").read_text())
        timings = json.loads((work / "timings.json").read_text())
        write_study(results, args.scale, timings, args.out, eval_dir)
        log(f"wrote {args.out / 'study.md'}")
        return
    for sub in ("checkpoints", "bundles"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, Any] = {"combinations": {}}
    # Slowest first so parallel workers finish together.
    order = sorted(
        combos, key=lambda c: (c.startswith("diffusion"), c.endswith("ensemble")), reverse=True
    )
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {c: pool.submit(build_bundle, c, args.scale, str(work), args.seed) for c in order}
        for c in order:
            res = futures[c].result()
            timings["combinations"][c] = res
            log(f"built {c}: {res}")
    timings["build_s"] = round(time.perf_counter() - t0, 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, args.jobs)))
    t1 = time.perf_counter()
    eval_dir = work / "evaluation"
    results = evaluate(
        [work / "bundles" / c for c in combos],
        "synthetic",
        eval_dir,
        device="cpu",
        seed=args.seed,
        overwrite=True,
        **SCALES[args.scale]["evaluate"],
    )
    timings["evaluate_s"] = round(time.perf_counter() - t1, 1)
    timings["evaluate_per_bundle_s"] = {b["name"]: b["seconds"] for b in results["bundles"]}
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    write_study(results, args.scale, timings, args.out, eval_dir)
    log(f"wrote {args.out / 'study.md'}")
    print(json.dumps({"scale": args.scale, **timings}))


if __name__ == "__main__":
    main()
