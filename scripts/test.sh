#!/usr/bin/env bash
# Quick start 2: set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
# two workers (pytest-xdist), a test file per worker at a time: in-process tests run one torch
# thread each (tests/conftest.py), so two cores run two files; FAE_TEST_WORKERS=0 runs serially
exec python -m pytest -n "${FAE_TEST_WORKERS:-2}" --dist loadfile tests "$@"
