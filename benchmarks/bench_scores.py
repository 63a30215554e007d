"""The scan's entanglement from a 2^22-voxel sample vs every voxel; prints JSON.

    .venv/bin/python benchmarks/bench_scores.py [--shape 512 512 64] [--seeds 5]

Predicts a synthetic high-ambiguity scan (uqserve.data.make_volume) with the
shipped softmax-ensemble on the CPU, then computes the scan's AU~EU Spearman
rho exactly (``uncertainty.scan_entanglement``, what ``--exact-scores``
reports) and from the default sample (``uncertainty.sampled_scan_entanglement``)
for ``--seeds`` seeds: the error of each, the reported standard error and the
seconds of both (best of the seeds for the sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 64))
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()

    import uqserve
    from uqserve import uncertainty
    from uqserve.data import make_volume

    volume = make_volume(0, tuple(args.shape), ambiguity="high").volume
    with uqserve.Predictor("softmax-ensemble", uqserve.RuntimeOptions(device="cpu")) as p:
        pred = p.predict(volume)
    K = pred.prob.shape[0]
    t0 = time.perf_counter()
    exact = uncertainty.scan_entanglement(pred.tu, pred.au, pred.eu, K)
    exact_s = time.perf_counter() - t0
    runs = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        got = uncertainty.sampled_scan_entanglement(pred.tu, pred.au, pred.eu, K, seed=seed)
        runs.append((time.perf_counter() - t0, got))
    errors = [float(g.rho - exact) for _, g in runs if g.rho is not None and exact is not None]
    first = runs[0][1]
    print(
        json.dumps(
            {
                "shape": list(args.shape),
                "voxels": int(pred.tu.size),
                "population": first.population,
                "sample_size": first.size,
                "exact_rho": exact,
                "sampled_rho": [g.rho for _, g in runs],
                "errors": errors,
                "max_abs_error": max(map(abs, errors), default=None),
                "standard_error": first.standard_error,
                "rms_error_over_se": (
                    float(np.sqrt(np.mean(np.square(errors)))) / first.standard_error
                    if errors and first.standard_error > 0
                    else None
                ),
                "exact_s": exact_s,
                "sampled_s": min(s for s, _ in runs),
                "speedup": exact_s / min(s for s, _ in runs),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
