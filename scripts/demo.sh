#!/usr/bin/env bash
# Install (once) and run the whole pipeline on the embedded tiny world.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dmo demo "$@"
