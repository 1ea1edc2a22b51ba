#!/usr/bin/env bash
# Create ./.venv and install dmo with its lmms-eval, test and docs extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.dmo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing dmo into .venv (first time: a few minutes, ~7 GB with torch and lmms-eval)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[eval,test,docs]"
  touch "$stamp"
fi
