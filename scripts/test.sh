#!/usr/bin/env bash
# Install (once) dmo in .venv, LLaMA-Factory in .venv-lf (the ground-truth integration test runs the real one) and
# the CPU build of vLLM with dmo in .venv-vllm (the vllm tests start a real engine); check the code with ruff (lint
# and format); then run the suite: everything but the vllm tests from .venv, the vllm tests (-m vllm) from
# .venv-vllm. Extra arguments go to both pytest runs, e.g. -x.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_llamafactory.sh
bash scripts/install_vllm.sh
.venv/bin/python -m ruff check dmo tests benchmarks
.venv/bin/python -m ruff format --check dmo tests benchmarks
.venv/bin/python -m pytest -q -m "not vllm" "$@"
exec .venv-vllm/bin/python -m pytest -q -m vllm "$@"
