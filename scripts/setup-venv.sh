#!/usr/bin/env bash
# Create or reuse ./.venv with the pinned torch 2.14.1 / torchvision 0.29.1 and fae-pipe
# installed in editable mode. Re-running is cheap: the install is skipped while
# setup.cfg is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.fae-pipe-installed
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing torch 2.14.1, torchvision 0.29.1 and fae-pipe[test] (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
