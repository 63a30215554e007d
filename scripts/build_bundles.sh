#!/usr/bin/env bash
# Rebuild the shipped bundles from their recipes (train + export + calibrate).
# About 10 minutes on 2 CPU cores; each bundle is well under 5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
UQSERVE=${UQSERVE:-.venv/bin/uqserve}
for name in softmax-ensemble ssn-ensemble; do
  "$UQSERVE" export --recipe "export/$name.toml" -o "uqserve/bundles/$name" --overwrite
done
