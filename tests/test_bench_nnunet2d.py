"""benchmarks/bench_predict.py --network nnunet-2d: the CPU smoke run of the GPU benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("nnunetv2", reason="needs the nnunet extra")
pytest.importorskip("dynamic_network_architectures", reason="needs the nnunet extra")


@pytest.mark.slow
def test_nnunet2d_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    script = str(ROOT / "benchmarks" / "bench_predict.py")
    cmd = [sys.executable, script, "--network", "nnunet-2d", "--members", "2",
           "--device", "cpu", "--shape", "128", "128", "8"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert r["network"] == "nnunet-2d" and r["members"] == 2 and r["shape"] == [128, 128, 8]
    # nnU-Net's planner stops at a 4 x 4 bottleneck: 6 stages of 32-512 features for 128^2
    assert r["parameters_per_member"] == 20_619_082
    uq, nn = r["uqserve"], r["nnunet"]
    assert uq["model_alone_s"] > 0 and uq["total_s"] > 0  # numbers only, no timing claims
    assert r["total_over_model"] == pytest.approx(uq["total_s"] / uq["model_alone_s"])
    assert set(uq["stages"]) >= {"read_s", "model_s", "scores_s", "write_s"}
    assert nn["model_s"] > 0 and nn["total_s"] > 0 and nn["slices"] == 8
    assert r["model_over_nnunet_model"] == pytest.approx(uq["model_alone_s"] / nn["model_s"])
    assert r["peak_gpu_mib"] is None and uq["peak_rss_mib"] > 0
    assert not list(tmp_path.glob("bench_nnunet2d_*"))  # its temporary folder is gone
