#!/usr/bin/env bash
# Install (once) dmo and, in its own venv, LLaMA-Factory (the ground-truth integration test runs the real one),
# then run the whole test suite. Extra arguments go to pytest, e.g. -m "not llamafactory".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_llamafactory.sh
exec .venv/bin/python -m pytest -q "$@"
