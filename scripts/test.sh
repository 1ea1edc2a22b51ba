#!/usr/bin/env bash
# Install (once) dmo, LLaMA-Factory in its own venv (the ground-truth integration test runs the real one) and the
# real vLLM package in .venv-vllm, layered on .venv (its glue is tested against vLLM's classes; no engine runs on
# a CPU), then run the whole test suite from .venv-vllm. Extra arguments go to pytest, e.g. -m "not llamafactory".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_llamafactory.sh
bash scripts/install_vllm.sh
exec .venv-vllm/bin/python -m pytest -q "$@"
