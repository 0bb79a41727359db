#!/usr/bin/env bash
# Quick start 2: set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest tests "$@"
