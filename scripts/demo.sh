#!/usr/bin/env bash
# Quick start 1: set up, then run the whole offline demo with `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
dvc repro "$@"
echo "demo: finished in $(( $(date +%s) - start )) s"
# the pipeline file given (default dvc.yaml) reads the params.yaml beside it
dir=.
for a in "$@"; do case "$a" in *dvc.yaml) dir=$(dirname "$a");; esac; done
params="$dir/params.yaml"
out() { sed -nE "s/^  $1:\s*([^ #]+).*/\1/p" "$params" | head -1; }
echo "demo: sample grid  -> $(out samples)/grid.png"
echo "demo: metrics      -> $(out metrics)/*.json   (dvc metrics show)"
echo "demo: loss curves  -> dvc plots show   (writes dvc_plots/index.html)"
if grep -qE '^\s*weights:\s*random' "$params"; then
  echo "demo: NOTE the encoders ran with RANDOMLY INITIALISED weights (weights: random in $params)."
  echo "      For real features put checkpoints on disk and set image_encoder.weights (and text_encoder.weights) to them"
fi
