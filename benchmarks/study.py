"""The AU x EU study: all 20 combinations, several seeds, resumable, with intervals.

    .venv/bin/python benchmarks/study.py --scale power            # the study (~18 CPU-h)
    .venv/bin/python benchmarks/study.py --scale power --device cuda --jobs 4
    .venv/bin/python benchmarks/study.py --scale power --report   # tables/figures only

One *run* is one combination at one seed: train (or reuse the shared networks of
its AU method and seed, see :func:`shared_network`), export, evaluate.
Each finished run is saved as ``results/runs/<scale>/<combination>/seed<k>.json``
(the learn check, the timings of each part, the per-shift AUROCs of AU and EU,
the paper's Δ with every value it comes from) and skipped when the script is
run again, so a study can be spread over many sittings and the per-run files
committed as they come. ``--report`` rebuilds ``results/study.md``,
``results/study.json`` and ``results/figures/study_*.png`` from the committed
per-run files alone (no training, no evaluation).

Every number in the report is a mean over seeds with a 95 % t-interval. A
finding of the paper gets a verdict only where the interval of the paired
difference (per seed) excludes 0: "supported" or "contradicted"; otherwise
"inconclusive". The learn check (held-out Dice of the trained networks
against the annotators' majority vote, >= 0.6) is printed per run and listed
in the report; each run records the process CPU seconds of each part (the
cost table). Checkpoints, shared networks and bundles go to ``--work``
(default ``build/study-<scale>``, not committed). Prints one JSON line per run.
With ``--out`` the repository's ``results``, ``--report`` also rewrites the
generated statements in README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("noise", "blur", "contrast", "jpeg")  # the paper's four corruptions
LEARN_DICE = 0.6  # held-out Dice vs the annotators' majority a trained network must reach

_EVAL_BIG = {"n_test": 50, "n_val": 32, "n_ood": 50, "severities": (0.5, 1.0), "shifts": PAPER}
# Everything that defines a scale, in one place (quoted in results/study.md).
# ID test images = 2 * n_test (low and high ambiguity); images per shift =
# n_ood * len(severities); only the paper's four shifts (the only ones Δ uses).
# SWAG: 30 snapshots over the last ~9 % of the steps (the paper: one per epoch over
# the last 30 of 320 epochs); the SSN warm-up is 10/320 of the steps (the default).
SCALES: dict[str, dict[str, Any]] = {
    # The study: >= 100 ID test images and >= 100 per shift, >= 3 seeds.
    "power": {
        "train": {
            "steps": 2000, "batch_size": 8, "size": (64, 64), "image_size": 64,
            "num_images": 512, "num_members": 5, "num_masks": 10, "swag_draws": 10,
            "swag_snapshots": 30, "swag_every": 6, "ambiguity": "high", "validate": 32,
        },
        "model": {"width": 16, "depth": 3, "num_samples": 10, "diffusion_steps": 10},
        "evaluate": _EVAL_BIG,
        "seeds": (0, 1, 2),
    },
    # A quicker look with the same test-set sizes (hours on 2 cores).
    "tiny": {
        "train": {
            "steps": 1600, "batch_size": 8, "size": (32, 32), "image_size": 32,
            "num_images": 192, "num_members": 3, "num_masks": 4, "swag_draws": 4,
            "swag_snapshots": 30, "swag_every": 5, "ambiguity": "high", "validate": 16,
        },
        "model": {"width": 8, "depth": 2, "num_samples": 4, "diffusion_steps": 4},
        "evaluate": _EVAL_BIG,
        "seeds": (0, 1, 2),
    },
    # Seconds per run: proves the machinery; its numbers mean nothing.
    "smoke": {
        "train": {
            "steps": 6, "batch_size": 2, "size": (16, 16), "image_size": 16, "num_images": 8,
            "num_members": 2, "num_masks": 2, "swag_draws": 2, "swag_snapshots": 2,
            "swag_every": 2, "ambiguity": "high", "validate": 4,
        },
        "model": {"width": 4, "depth": 1, "num_samples": 2, "diffusion_steps": 2},
        "evaluate": {"n_test": 3, "n_val": 4, "n_ood": 3, "shifts": PAPER,
                     "severities": (1.0,)},
        "seeds": (0, 1),
    },
}  # fmt: skip

# Per-run numbers the report aggregates: (key, label, digits, higher is better).
# Labels say what is computed where it is not the paper's definition (see NOTES).
METRICS: tuple[tuple[str, str, int, bool], ...] = (
    ("dice_vs_majority", "learn Dice", 2, True),
    ("dice", "Dice", 3, True),
    ("ged2_paper", "GED² paper", 3, False),
    ("ged2", "GED² IoU", 3, False),
    ("hm_iou", "HM-IoU¹", 3, True),
    ("ncc_au", "NCC(AU)", 3, True),
    ("ece", "ECE²", 3, False),
    ("ace_tu", "ACE(TU)", 3, False),
    ("auroc_eu_paper", "AUROC EU", 2, True),
    ("auroc_au_paper", "AUROC AU", 2, True),
    ("auroc_tu_paper", "AUROC TU", 2, True),
    ("delta_ood", "Δ OOD", 2, True),
    ("delta_ambiguity", "Δ amb.", 2, True),
    ("delta_calibration", "Δ cal.", 2, True),
    ("delta_mean", "Δ mean", 2, True),
)
NOTES = (
    "GED² paper: the paper's variant (d = 1 − Dice, within each member's samples, "
    "averaged over members); GED² IoU: Kohl et al.'s (d = 1 − IoU over all samples). "
    "¹ HM-IoU (Hungarian-matched IoU) is not in the paper's code. ² ECE: uqserve's "
    "expected calibration error of max p̄ (15 bins, accuracy = share of annotators "
    "agreeing), not a quantity the paper reports; ACE(TU) is the paper's uncertainty "
    "calibration error behind Δ cal. AUROC EU/AU: image-level AUROC with uqserve's "
    "`border` aggregator (not established as the paper's), averaged over the paper's "
    "four shifts (noise, blur, contrast, JPEG). "
    "Δ as the paper (OOD on those averaged AUROCs; ambiguity and calibration: the mean "
    "of Δ on ID and on the mean of those shifts). PERFRANK/ENTRANK: the paper's rank "
    "scores (1 = best), ranked within each seed."
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_path(runs: Path, scale: str, combination: str, seed: int) -> Path:
    return runs / scale / combination / f"seed{seed}.json"


# ------------------------------------------------------------------------------- one run


def _cpu_s() -> float:
    """CPU seconds of this process so far (user + system, every thread: torch, onnxruntime)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Clock:
    """CPU seconds (and wall seconds) per part of a run, for the cost table."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._at = (_cpu_s(), time.perf_counter())

    def lap(self, part: str) -> None:
        now = (_cpu_s(), time.perf_counter())
        self.cpu[part] = self.cpu.get(part, 0.0) + now[0] - self._at[0]
        self.wall[part] = self.wall.get(part, 0.0) + now[1] - self._at[1]
        self._at = now


def shared_network(au: str, seed: int, m: int, scale: str, work: Path, device: str) -> Path:
    """The ``<au>-none`` network ``m`` of ``seed``, trained once and cached under ``work``.

    Network 0 is the ``none`` row, ensemble member 0 and (its SWAG statistics are
    collected on the side) the SWAG and SWAG-D rows; networks 1.. are the other
    ensemble members (seeded ``1000 seed + m``, as ``train`` seeds ensemble members).
    A file lock makes parallel runs wait for one another instead of training twice.
    """
    import fcntl

    from uqserve.models import ModelConfig
    from uqserve.training import TrainConfig, train

    cfg = SCALES[scale]
    path = work / f"seed{seed}" / "shared" / f"{au}-net{m}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            train(f"{au}-none", path, config=TrainConfig(**cfg["train"], threads=1, device=device),
                  model_config=ModelConfig(**cfg["model"]), seed=1000 * seed + m,
                  overwrite=True, collect_swag=m == 0)  # fmt: skip
            log(f"trained shared {au}-net{m} of seed {seed}")
    return path


def checkpoints_for(
    combination: str, seed: int, scale: str, work: Path, device: str
) -> tuple[Path, list[str]]:
    """The checkpoint folder of one run and the shared networks it needed.

    MC dropout trains its own network; every other row is assembled from the
    shared ``none`` networks of its AU method and seed (see :func:`shared_network`).
    """
    from uqserve.models import ModelConfig
    from uqserve.training import TrainConfig, assemble_checkpoints, train

    cfg = SCALES[scale]
    au, eu = combination.split("-")
    out = work / f"seed{seed}" / "checkpoints" / combination
    out.parent.mkdir(parents=True, exist_ok=True)
    if eu == "mcdropout":
        tc = TrainConfig(**cfg["train"], threads=1, device=device)
        train(combination, out, config=tc, model_config=ModelConfig(**cfg["model"]),
              seed=1000 * seed, overwrite=True)  # fmt: skip
        return out, []
    n = cfg["train"]["num_members"] if eu == "ensemble" else 1
    nets = [shared_network(au, seed, m, scale, work, device) for m in range(n)]
    assemble_checkpoints(nets, combination, out, overwrite=True)
    return out, [p.name for p in nets]


def run_one(
    combination: str, seed: int, scale: str, work: str, runs: str, device: str
) -> dict[str, Any]:
    """Train (or reuse), export and evaluate one combination at one seed; save the run.

    The record's ``timings`` are wall seconds, ``cpu_s`` process CPU seconds (the
    cost table uses these: on a shared machine wall time measures the neighbours);
    ``trained_here`` lists the shared networks this run trained (later runs reuse them).
    """
    import torch

    torch.set_num_threads(1)
    from uqserve.evaluate import evaluate
    from uqserve.exporting import export_checkpoints

    out = run_path(Path(runs), scale, combination, seed)
    if out.is_file():
        return {"combination": combination, "seed": seed, "skipped": True}
    cfg = SCALES[scale]
    root = Path(work) / f"seed{seed}"
    bundle = root / "bundles" / combination
    (root / "bundles").mkdir(parents=True, exist_ok=True)
    before = _trained(Path(work), seed)
    clock = _Clock()
    ckpt, shared = checkpoints_for(combination, seed, scale, Path(work), device)
    clock.lap("train")
    export_checkpoints(ckpt, bundle, name=combination, calibrate=False, overwrite=True)
    clock.lap("export")
    res = evaluate([bundle], "synthetic", device="cpu", seed=seed, figures=False,
                   **cfg["evaluate"])  # fmt: skip
    clock.lap("evaluate")
    validation = json.loads((ckpt / "config.json").read_text()).get("validation", {})
    record = _record(combination, seed, scale, res["bundles"][0], validation, clock.wall)
    record["cpu_s"] = {k: round(v, 1) for k, v in clock.cpu.items()}
    record["shared_networks"] = shared
    record["trained_here"] = sorted(_trained(Path(work), seed) - before)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)  # a run is there completely or not at all
    return {k: record[k] for k in ("combination", "seed", "learn_check", "cpu_s")}


def _trained(work: Path, seed: int) -> set[str]:
    """The shared networks of ``seed`` that exist under ``work``."""
    return {p.parent.name for p in (work / f"seed{seed}" / "shared").glob("*/config.json")}


def _record(
    combination: str,
    seed: int,
    scale: str,
    entry: dict[str, Any],
    validation: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    from uqserve import __version__
    from uqserve.evaluate import summary_row

    res = entry["results"]
    dice = validation.get("dice_vs_majority_mean")
    row = summary_row(entry)
    row["dice_vs_majority"] = dice
    return {
        "combination": combination,
        "seed": seed,
        "scale": scale,
        "config": SCALES[scale],
        "uqserve_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "learn_check": {
            "dice_vs_majority": dice,
            "per_network": validation.get("dice_vs_majority"),
            "threshold": LEARN_DICE,
            "passed": dice is not None and dice >= LEARN_DICE,
        },
        "timings": {f"{k}_s": round(v, 1) for k, v in timings.items()},
        "row": row,
        "convention": res["convention"],
        "delta": res["delta"],
        "shifts": res["shifts"],
        "splits": res["splits"],
    }


# ------------------------------------------------------------------------ statistics


def t_interval(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and 95 % t-interval half-width over the finite ``values`` (None when < 2)."""
    from scipy import stats

    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "half": None, "n": 0}
    mean = sum(v) / len(v)
    if len(v) < 2:
        return {"mean": mean, "half": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    half = float(stats.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))
    return {"mean": mean, "half": half, "n": len(v)}


def verdict(interval: dict[str, Any]) -> str:
    """ "supported" when the interval of (paper's claim) lies above 0, "contradicted"
    below, else "inconclusive" (also with fewer than two seeds)."""
    m, h = interval["mean"], interval["half"]
    if m is None or h is None:
        return "inconclusive"
    if m - h > 0:
        return "supported"
    return "contradicted" if m + h < 0 else "inconclusive"


def _fmt(iv: dict[str, Any], d: int = 2) -> str:
    if iv["mean"] is None:
        return "–"
    return f"{iv['mean']:.{d}f}" + ("" if iv["half"] is None else f" ± {iv['half']:.{d}f}")


# ------------------------------------------------------------------------- the report


def load_runs(runs: Path, scale: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((runs / scale).glob("*/seed*.json"))]


def _per_seed(runs: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    by: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(int(r["seed"]), {})[r["combination"]] = r
    return by


def _group_diff(
    seeds: dict[int, dict[str, dict[str, Any]]],
    key: str,
    a: Callable[[str], bool],
    b: Callable[[str], bool] | None,
    sign: float = 1.0,
) -> dict[str, Any]:
    """Per seed: sign * (mean of ``key`` over rows in ``a`` - over rows in ``b``, or - 0
    when ``b`` is None); t-interval over seeds."""

    def mean(rows: dict[str, dict[str, Any]], pick: Callable[[str], bool]) -> float | None:
        v = [r["row"].get(key) for c, r in rows.items() if pick(c)]
        f = [x for x in v if x is not None and math.isfinite(x)]
        return sum(f) / len(f) if f else None

    diffs = []
    for rows in seeds.values():
        ma, mb = mean(rows, a), (0.0 if b is None else mean(rows, b))
        if ma is not None and mb is not None:
            diffs.append(sign * (ma - mb))
    return t_interval(diffs)


def _rank_gap(
    seeds: dict[int, dict[str, dict[str, Any]]], key: str, model: str = "softmax-ensemble"
) -> dict[str, Any]:
    """Per seed: the best rank ``key`` of the other models minus ``model``'s (> 0: it is first)."""
    from uqserve.evaluation.paper import rank_scores

    gaps = []
    for rows in seeds.values():
        ranks = rank_scores({c: r["delta"]["paper"] for c, r in rows.items()
                             if r["delta"].get("paper")})  # fmt: skip
        own = ranks.get(model, {}).get(key)
        others = [v[key] for c, v in ranks.items() if c != model and math.isfinite(v[key])]
        if own is not None and math.isfinite(own) and others:
            gaps.append(min(others) - own)
    return t_interval(gaps)


def findings(runs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """The paper's findings as (claim, interval of the paired difference, verdict)."""
    seeds = _per_seed(runs)

    def eu(c: str) -> str:
        return c.split("-")[1]

    def au(c: str) -> str:
        return c.split("-")[0]

    def signal(c: str) -> bool:
        return c != "softmax-none"

    claims = [
        ("Ensembles are less entangled for OOD detection (Δ OOD, ensembles minus other rows)",
         _group_diff(seeds, "delta_ood", lambda c: eu(c) == "ensemble",
                     lambda c: eu(c) != "ensemble" and signal(c))),
        ("Ensembles detect OOD best (mean AUROC of EU over the paper's shifts)",
         _group_diff(seeds, "auroc_eu_paper", lambda c: eu(c) == "ensemble",
                     lambda c: eu(c) != "ensemble" and signal(c))),
        ("Softmax/SSN models model ambiguity well (NCC of AU vs PUNet/diffusion rows)",
         _group_diff(seeds, "ncc_au", lambda c: au(c) in ("softmax", "ssn") and signal(c),
                     lambda c: au(c) in ("punet", "diffusion"))),
        ("Softmax/SSN models are well calibrated (ACE of TU, lower is better)",
         _group_diff(seeds, "ace_tu", lambda c: au(c) in ("softmax", "ssn") and signal(c),
                     lambda c: au(c) in ("punet", "diffusion"), sign=-1.0)),
        ("Probabilistic UNets are less entangled for ambiguity (Δ ambiguity)",
         _group_diff(seeds, "delta_ambiguity", lambda c: au(c) == "punet",
                     lambda c: au(c) != "punet" and signal(c))),
        ("Probabilistic UNets are less entangled for calibration (Δ calibration)",
         _group_diff(seeds, "delta_calibration", lambda c: au(c) == "punet",
                     lambda c: au(c) != "punet" and signal(c))),
        ("A softmax ensemble ranks first on performance (best other PERFRANK minus its own)",
         _rank_gap(seeds, "PERFRANK_avg")),
        ("A softmax ensemble ranks first on disentanglement (best other ENTRANK minus its own)",
         _rank_gap(seeds, "ENTRANK_avg")),
        ("'No EU' rows with samples have Δ < 0 (minus their mean Δ)",
         _group_diff(seeds, "delta_mean", lambda c: eu(c) == "none" and signal(c), None,
                     sign=-1.0)),
    ]  # fmt: skip
    return [(text, iv, verdict(iv)) for text, iv in claims]


def rank_table(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """PERFRANK/ENTRANK per combination: ranks within each seed, then mean ± CI over seeds."""
    from uqserve.evaluation.paper import rank_scores

    per: dict[str, dict[str, list[float]]] = {}
    for rows in _per_seed(runs).values():
        models = {c: r["delta"]["paper"] for c, r in rows.items() if r["delta"].get("paper")}
        for c, ranks in rank_scores(models).items():
            for k, v in ranks.items():
                per.setdefault(c, {}).setdefault(k, []).append(v)
    return {c: {k: t_interval(v) for k, v in ks.items()} for c, ks in per.items()}


def _with_tu(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` with ``row["auroc_tu_paper"]``: TU's AUROC averaged over the paper's shifts
    (from the per-shift values every run file keeps), as AU's and EU's are."""
    v = [run.get("shifts", {}).get(s, {}).get("auroc_tu") for s in PAPER]
    f = [float(x) for x in v if x is not None and math.isfinite(x)]
    tu = sum(f) / len(f) if len(f) == len(PAPER) else None
    return {**run, "row": {**run["row"], "auroc_tu_paper": tu}}


def aggregate(runs: list[dict[str, Any]], scale: str) -> dict[str, Any]:
    runs = [_with_tu(r) for r in runs]
    combos = sorted({r["combination"] for r in runs}, key=_order)
    table = {
        c: {k: t_interval([r["row"].get(k) for r in runs if r["combination"] == c])
            for k, *_ in METRICS}
        for c in combos
    }  # fmt: skip
    learn = [{"combination": r["combination"], "seed": r["seed"], **r["learn_check"]} for r in runs]
    agg = {
        "combinations": table,
        "ranks": rank_table(runs),
        "findings": [{"claim": t, "interval": iv, "verdict": v} for t, iv, v in findings(runs)],
        "learn_check": learn,
        "cost": cost_table(runs, scale),
        "missing": missing_runs(runs, scale),
        "seeds": sorted({int(r["seed"]) for r in runs}),
        "runs": len(runs),
        # Per combination and seed: per-shift AUROCs of AU and EU, the paper means next to
        # Δ OOD, and the paper's Δ with every value it comes from (recomputable).
        "per_run": [
            {
                "combination": r["combination"],
                "seed": r["seed"],
                "row": r["row"],
                "paper": r["delta"].get("paper"),
            }
            for r in runs
        ],
    }
    agg["statements"] = statements(agg, scale)
    return agg


def missing_runs(runs: list[dict[str, Any]], scale: str) -> dict[str, list[str]]:
    """Per seed of the scale, the combinations without a finished run."""
    from uqserve.models import COMBINATIONS

    have = {(r["combination"], int(r["seed"])) for r in runs}
    out = {f"seed{s}": [c for c in COMBINATIONS if (c, s) not in have]
           for s in SCALES[scale]["seeds"]}  # fmt: skip
    return {k: v for k, v in out.items() if v}


CPU_PARTS = ("train", "export", "evaluate")


def cost_table(runs: list[dict[str, Any]], scale: str) -> dict[str, Any]:
    """Process CPU seconds (not wall: the machine is shared) per run, per AU method and
    for the grid. A run's ``train`` includes the shared networks it trained first (the
    ``none`` run trains network 0, the ensemble run networks 1..M-1; MC dropout its own);
    the grid is the sum of the per-combination means x the scale's seed count."""
    per: dict[str, dict[str, float]] = {}
    for c in sorted({r["combination"] for r in runs if "cpu_s" in r}, key=_order):
        rs = [r["cpu_s"] for r in runs if r["combination"] == c and "cpu_s" in r]
        per[c] = {p: round(sum(x.get(p, 0.0) for x in rs) / len(rs), 1) for p in CPU_PARTS}
        per[c]["run"] = round(sum(per[c][p] for p in CPU_PARTS), 1)
        per[c]["n"] = len(rs)
    au: dict[str, dict[str, float]] = {}
    for c, v in per.items():
        a = au.setdefault(c.split("-")[0], {**dict.fromkeys(CPU_PARTS, 0.0), "run": 0.0,
                                            "combinations": 0})  # fmt: skip
        for p in (*CPU_PARTS, "run"):
            a[p] = round(a[p] + v[p], 1)
        a["combinations"] += 1
    seed_cpu = sum(v["run"] for v in per.values())
    seeds = len(SCALES[scale]["seeds"])
    return {
        "per_combination": per,
        "per_au_method_per_seed": au,
        "measured_combinations": len(per),
        "grid_cpu_s": round(seed_cpu * seeds, 1),
        "grid_wall_h_jobs2": round(seed_cpu * seeds / 2 / 3600, 1),
        "seeds": seeds,
    }


def statements(agg: dict[str, Any], scale: str) -> list[str]:
    """The sentences the README and the docs show about the findings (from study.json)."""
    from uqserve.models import COMBINATIONS

    expected = len(COMBINATIONS) * len(SCALES[scale]["seeds"])
    where = (f"`{scale}` scale, {agg['runs']} of {expected} runs, seeds "
             f"{agg['seeds'] or 'none'}")  # fmt: skip
    if not agg["runs"]:
        return [f"No run of the study has finished yet ({where})."]
    out = [f"Study status ({where}): " + (
        "the grid is complete." if not agg["missing"]
        else f"{sum(len(v) for v in agg['missing'].values())} runs missing, so every "
        "grouped claim below averages only the rows that exist.")]  # fmt: skip
    for f in agg["findings"]:
        out.append(f"{f['claim']}: **{f['verdict']}** ({_fmt(f['interval'])}, {where}).")
    weak = [x for x in agg["learn_check"] if not x["passed"]]
    out.append(
        f"Learn check: {len(agg['learn_check']) - len(weak)} of "
        f"{len(agg['learn_check'])} runs reach Dice ≥ {LEARN_DICE} vs the majority."
    )
    return out


RUN_ORDER = ("none", "swag", "swagdiag", "mcdropout", "ensemble")


def _run_order(c: str) -> tuple[int, int]:
    return RUN_ORDER.index(c.split("-")[1]), _order(c)[0]


def _order(c: str) -> tuple[int, int]:
    from uqserve.models import AU_METHODS, EU_METHODS

    a, e = c.split("-")
    return AU_METHODS.index(a), EU_METHODS.index(e)


def write_report(runs: list[dict[str, Any]], scale: str, out: Path) -> dict[str, Any]:
    """``out/study.md``, ``out/study.json`` and ``out/figures/study_*.png`` from the runs."""
    agg = aggregate(runs, scale)
    study = {"scale": scale, "config": SCALES[scale], **agg}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    figures = _figures(agg, out / "figures")
    drawn = [p.name for p in sorted((out / "figures").glob(f"{EVAL_FIGURES}*.png"))]
    (out / "study.md").write_text(_markdown(agg, scale, figures, drawn))
    return study


STATEMENTS_BEGIN = "<!-- study-statements: generated by benchmarks/study.py --report -->"
STATEMENTS_END = "<!-- /study-statements -->"


def update_statements(path: Path, lines: Sequence[str]) -> bool:
    """Replace the block between the statement markers in ``path`` (True when found)."""
    text = path.read_text()
    a, b = text.find(STATEMENTS_BEGIN), text.find(STATEMENTS_END)
    if a < 0 or b < a:
        return False
    body = "\n".join(f"- {x}" for x in lines)
    path.write_text(text[: a + len(STATEMENTS_BEGIN)] + "\n" + body + "\n" + text[b:])
    return True


def _table(agg: dict[str, Any]) -> list[str]:
    head = ["combination", *[m[1] for m in METRICS], "PERFRANK", "ENTRANK"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, vals in agg["combinations"].items():
        r = agg["ranks"].get(c, {})
        cells = [_fmt(vals[k], d) for k, _, d, _ in METRICS]
        cells += [_fmt(r[k], 1) if k in r else "–" for k in ("PERFRANK_avg", "ENTRANK_avg")]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _cost_lines(cost: dict[str, Any]) -> list[str]:
    head = "| {} | train | export | evaluate | per run |"
    lines = [head.format("combination (runs)"), "|---|---|---|---|---|"]
    for c, v in cost["per_combination"].items():
        lines.append(f"| {c} ({v['n']}) | " + " | ".join(f"{v[p]:.0f}" for p in
                     (*CPU_PARTS, "run")) + " |")  # fmt: skip
    lines += [
        "",
        "| AU method: its rows of one seed (rows measured) | train | export | evaluate "
        "| all its rows |",
        "|---|---|---|---|---|",
    ]
    for a, v in cost["per_au_method_per_seed"].items():
        lines.append(f"| {a} ({v['combinations']}) | " + " | ".join(f"{v[p]:.0f}" for p in
                     (*CPU_PARTS, "run")) + " |")  # fmt: skip
    part = (
        ""
        if cost["measured_combinations"] == 20
        else (f" (only {cost['measured_combinations']} of 20 combinations measured: a lower bound)")
    )
    return [
        *lines,
        "",
        f"Grid, {cost['seeds']} seeds: {cost['grid_cpu_s']:.0f} CPU-s{part}, "
        f"about {cost['grid_wall_h_jobs2']} h wall at `--jobs 2` on two free cores.",
    ]


def _markdown(
    agg: dict[str, Any], scale: str, figures: list[str], eval_figures: Sequence[str] = ()
) -> str:
    weak = [x for x in agg["learn_check"] if not x["passed"]]
    missing = agg["missing"]
    text = [
        f"# The AU x EU study (scale: {scale})",
        "",
        *(["**SMOKE RUN: this only proves that the machinery works. Its networks are "
           "untrained and its numbers mean nothing; it supports no finding.**", ""]
          if scale == "smoke" else []),
        f"{agg['runs']} runs, seeds {agg['seeds']}. Rebuilt from `results/runs/{scale}/` by "
        f"`benchmarks/study.py --scale {scale} --report`. Every number: mean ± 95 % "
        "t-interval over seeds (no ± with one seed).",
        "",
        *(["**Incomplete: runs missing** (the grid is 20 combinations x seeds "
           f"{list(SCALES[scale]['seeds'])}): "
           + "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items()), ""]
          if missing else []),
        f"Scale: `{json.dumps(SCALES[scale], default=list)}`",
        "",
        "## Method",
        "",
        "Shared training, as the paper's method allows: per AU method and seed, network 0 "
        "(seed 1000 s) is the `none` row, ensemble member 0, and, its SWAG statistics "
        "collected on the side of the same run (the paper's SWAG observes an ordinary run: "
        "one snapshot per epoch over its last 30 of 320 epochs; here 30 over the last ~9 % "
        "of the steps), the SWAG and SWAG-D rows (which differ only in the covariance they "
        "keep); networks 1..4 (seeds 1000 s + m) complete the ensemble; MC dropout trains "
        "its own network with dropout. Each shared network is trained once and reused. "
        "Evaluation uses only the paper's four shifts; no calibration step (its outputs "
        "feed nothing here).",
        "",
        "## Results",
        "",
        *_table(agg),
        "",
        NOTES,
        "",
        "## The paper's findings",
        "",
        "A verdict only where the 95 % interval of the per-seed difference excludes 0.",
        "",
        *[f"- {f['claim']}: {_fmt(f['interval'])} → **{f['verdict']}**" for f in agg["findings"]],
        "",
        f"## Learn check (held-out Dice vs majority ≥ {LEARN_DICE})",
        "",
        "All runs passed." if not weak else "Below the bar (not a result; the recipe must be "
        "fixed and the run redone): " + ", ".join(
            f"{x['combination']} seed {x['seed']} ({_num(x['dice_vs_majority'])})" for x in weak),
        "",
        "## Cost (process CPU seconds per run, mean over seeds)",
        "",
        "CPU seconds of the run's process (user + system, all threads), not wall time: "
        "the machine is shared, so wall time measures the neighbours.",
        "",
        *_cost_lines(agg["cost"]),
        "",
        *[f"![{f}](figures/{f})" for f in figures],
        "",
        *(["## Figures from `uqserve evaluate`", "",
           f"Drawn by `benchmarks/study.py --scale {scale} --figures COMBINATION...` from the "
           "bundles of finished runs (seed 0 unless told), on the runs' test sets.", "",
           *[f"![{f}](figures/{f})" for f in eval_figures], ""] if eval_figures else []),
    ]  # fmt: skip
    return "\n".join(text)


def evaluate_figures(
    combinations: Sequence[str], seed: int, scale: str, work: Path, folder: Path
) -> list[Path]:
    """``uqserve evaluate``'s figures (reliability, AU vs EU, OOD histograms, samples, and
    a summary of the set) for the bundles of finished runs, evaluated side by side on the
    run's test sets (same seed, same sizes), into ``folder/study_eval_*.png``."""
    import shutil
    import tempfile

    from uqserve.evaluate import evaluate

    bundles = [work / f"seed{seed}" / "bundles" / c for c in combinations]
    absent = [str(b) for b in bundles if not (b / "manifest.json").is_file()]
    if absent:
        raise SystemExit(f"--figures: no bundle at {', '.join(absent)}; run those first")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        evaluate(bundles, "synthetic", Path(tmp) / "eval", device="cpu", seed=seed,
                 figures=True, **SCALES[scale]["evaluate"])  # fmt: skip
        for old in folder.glob(f"{EVAL_FIGURES}*.png"):
            old.unlink()
        for png in sorted((Path(tmp) / "eval" / "figures").glob("*.png")):
            shutil.copyfile(png, folder / f"{EVAL_FIGURES}{png.name}")
    return sorted(folder.glob(f"{EVAL_FIGURES}*.png"))


EVAL_FIGURES = "study_eval_"  # prefix of --figures' files in results/figures


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _figures(agg: dict[str, Any], folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    combos = list(agg["combinations"])
    keys = ("delta_ood", "delta_ambiguity", "delta_calibration")
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(combos)), 4))
    width = 0.27
    for i, k in enumerate(keys):
        ivs = [agg["combinations"][c][k] for c in combos]
        means = [iv["mean"] if iv["mean"] is not None else math.nan for iv in ivs]
        errs = [iv["half"] if iv["half"] is not None else 0.0 for iv in ivs]
        xs = [j + (i - 1) * width for j in range(len(combos))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=k)
    ax.set_xticks(range(len(combos)), combos, rotation=70, ha="right", fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("Δ (1 = disentangled)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "study_delta.png", dpi=110)
    plt.close(fig)
    return ["study_delta.png"]


# ------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="power")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="default: the scale's")
    ap.add_argument("--combinations", nargs="*", default=None, help="default: all 20")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    ap.add_argument("--device", default="cpu", help="training device: cpu, cuda or cuda:N")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from runs/")
    ap.add_argument(
        "--figures",
        nargs="+",
        default=None,
        metavar="COMBINATION",
        help="only draw `uqserve evaluate`'s figures of these finished runs' "
        "bundles (from --work, first of --seeds) into OUT/figures/study_eval/",
    )
    args = ap.parse_args(argv)
    from uqserve.models import COMBINATIONS

    runs_dir = args.out / "runs"
    if args.figures:
        seed = (args.seeds or [0])[0]
        work = args.work or ROOT / "build" / f"study-{args.scale}"
        for f in evaluate_figures(args.figures, seed, args.scale, work, args.out / "figures"):
            log(f"wrote {f}")
        return
    if not args.report:
        _check_device(args.device)
        seeds = args.seeds if args.seeds is not None else SCALES[args.scale]["seeds"]
        combos = list(args.combinations or COMBINATIONS)
        work = args.work or ROOT / "build" / f"study-{args.scale}"
        # Seed by seed (all of seed 0 first); within a seed the rows that reuse network 0
        # come before those that train more (MC dropout, then the ensembles).
        todo = [(c, s) for s in seeds for c in sorted(combos, key=_run_order)]
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [
                pool.submit(run_one, c, s, args.scale, str(work), str(runs_dir), args.device)
                for c, s in todo
            ]
            for f in futures:
                done = f.result()
                print(json.dumps(done), flush=True)
                lc = done.get("learn_check")
                if lc is not None:
                    ok = "passed" if lc["passed"] else "FAILED"
                    log(f"{done['combination']} seed {done['seed']}: learn check {ok} "
                        f"(Dice vs majority {_num(lc['dice_vs_majority'])})")  # fmt: skip
    runs = load_runs(runs_dir, args.scale)
    if not runs:
        raise SystemExit(f"{runs_dir / args.scale}: no runs yet; run without --report first")
    study = write_report(runs, args.scale, args.out)
    log(f"wrote {args.out / 'study.md'} from {len(runs)} runs")
    if args.out.resolve() == (ROOT / "results").resolve():  # the committed report
        for doc in (ROOT / "README.md", ROOT / "docs" / "benchmarks.md"):
            if update_statements(doc, study["statements"]):
                log(f"updated the study statements in {doc.relative_to(ROOT)}")


def _check_device(device: str) -> None:
    from uqserve.training import TrainConfig, TrainError, resolve_device

    try:
        resolve_device(TrainConfig(device=device).device)
    except TrainError as exc:
        raise SystemExit(f"--device: {exc}") from exc


if __name__ == "__main__":
    main()
