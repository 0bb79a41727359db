#!/usr/bin/env bash
# Quick start 1: set up, then run the whole offline demo with `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
dvc repro "$@"
echo "demo: finished in $(( $(date +%s) - start )) s"
echo "demo: sample grid  -> samples/grid.png"
echo "demo: metrics      -> metrics/*.json   (dvc metrics show)"
echo "demo: loss curves  -> dvc plots show   (writes dvc_plots/index.html)"
if grep -qE '^\s*weights:\s*random' params.yaml; then
  echo "demo: NOTE the DINOv2 encoder ran with RANDOMLY INITIALISED weights (image_encoder.weights: random)."
  echo "      For real features put a DINOv2 checkpoint on disk and set image_encoder.weights: /path/to/file.safetensors"
fi
