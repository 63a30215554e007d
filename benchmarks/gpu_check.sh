#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("GPU-resident predict"), in one command:
#
#     benchmarks/gpu_check.sh            # on a machine with an NVIDIA GPU, from the repo root
#
# Needs a virtual environment with every extra and onnxruntime-gpu (PYTHON, default
# .venv/bin/python). Writes one JSON file per run, plus versions.txt, into OUT
# (default benchmarks/out/gpu-<date>), and prints the headline numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${OUT:-benchmarks/out/gpu-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$DEST"
export PYTHONPATH=$PWD

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import onnxruntime as o, torch, numpy, sys; print("python", sys.version.split()[0]); print("onnxruntime", o.__version__, o.get_available_providers()); print("torch", torch.__version__, "cuda", torch.version.cuda); print("numpy", numpy.__version__)'
  "$PY" -c 'import nnunetv2, importlib.metadata as m; print("nnunetv2", m.version("nnunetv2"), "dynamic_network_architectures", m.version("dynamic_network_architectures"))'
} | tee "$DEST/versions.txt"

run() {  # name, then the arguments of bench_predict.py
  local name=$1
  shift
  echo "== $name: bench_predict.py $*" >&2
  timeout 1500 "$PY" benchmarks/bench_predict.py "$@" >"$DEST/$name.json" 2>"$DEST/$name.log" ||
    { echo "$name failed, see $DEST/$name.log" >&2; tail -5 "$DEST/$name.log" >&2; return 0; }
  "$PY" - "$DEST/$name.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("model_alone_s", "total_s", "total_over_model", "scans_per_hour", "peak_gpu_mib",
        "model_over_nnunet_model", "total_over_nnunet_total")
print(json.dumps({k: r.get(k) for k in keys} | {"nnunet": r["nnunet"], "vs_cpu_fp32": r.get("vs_cpu_fp32")}))
PYEOF
}

# The CUDA IOBinding path of --reduce graph against the host sums (skipped on a CPU).
"$PY" -m pytest -q -rs tests/test_reduce_graph.py 2>&1 | tee "$DEST/test_reduce_graph.txt" | tail -3 >&2 || true

# The headline: 512 x 512 x 300, 5 folds of nnU-Net's default 2d network, fp16 and exact fp32.
run nnunet2d_fp16 --network nnunet-2d --members 5 --shape 512 512 300 --device cuda --precision fp16
run nnunet2d_fp32 --network nnunet-2d --members 5 --shape 512 512 300 --device cuda --precision fp32
# The same with every member's outputs brought to the host: what the reduction graph saves.
run nnunet2d_fp16_host --network nnunet-2d --members 5 --shape 512 512 300 --device cuda --precision fp16 --reduce host
# Accuracy against fp32 on the CPU (TU/AU/EU within 1e-2, labels >= 99.9 %; fp32 within 1e-5),
# on 16 slices so that the CPU side stays short.
run accuracy_fp16 --network nnunet-2d --members 5 --shape 512 512 16 --device cuda --precision fp16 --compare-cpu
run accuracy_fp32 --network nnunet-2d --members 5 --shape 512 512 16 --device cuda --precision fp32 --compare-cpu
# The shipped-style ensembles, for the earlier table of docs/benchmarks.md.
run unet_fp16 --shape 512 512 300 --device cuda --precision fp16 --no-torch --no-naive --no-rss
echo "results in $DEST" >&2
