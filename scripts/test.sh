#!/usr/bin/env bash
# Install (once) dmo in .venv, LLaMA-Factory in .venv-lf (the ground-truth integration test runs the real one) and
# the CPU build of vLLM with dmo in .venv-vllm (the vllm tests start a real engine); then check and test:
#   1. ruff (lint and format), mypy (configured in pyproject.toml) and the documentation site (mkdocs build --strict:
#      a broken link or anchor fails it; built into a temporary folder, nothing is left in the tree);
#   2. the suite from .venv: everything but the vllm tests;
#   3. the numerical tests (-m numerical) once more on other kernels: MKL's SSE4.2 / compatible path, ATen's
#      non-vectorised one, one thread, in a shuffled order (the seed is printed) — a tolerance must hold for the maths, not for the
#      kernel path of the machine it was written on;
#   4. the vllm tests (-m vllm) from .venv-vllm.
# Every step runs even when an earlier one fails, so one run shows every failure; the exit status is non-zero if
# any step failed. Extra arguments go to every pytest run, e.g. -x.
set -uo pipefail
cd "$(dirname "$0")/.."
set -e
bash scripts/setup.sh
bash scripts/install_llamafactory.sh
bash scripts/install_vllm.sh
set +e

failed=()
step() {
  local name=$1
  shift
  echo "=== $name" >&2
  "$@"
  local rc=$?
  # pytest's 5 = no test selected (e.g. a -k that matches none of this step's tests): nothing failed
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    failed+=("$name (exit $rc)")
  fi
}

step "ruff check" .venv/bin/python -m ruff check dmo tests benchmarks
step "ruff format" .venv/bin/python -m ruff format --check dmo tests benchmarks
step "mypy" .venv/bin/python -m mypy
site=$(mktemp -d)
step "docs" env NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict -d "$site"  # not --quiet: it hides the warnings that --strict counts
rm -rf "$site"
step "tests" .venv/bin/python -m pytest -q -m "not vllm" "$@"
# MKL_CBWR=COMPATIBLE: on AMD CPUs MKL ignores MKL_ENABLE_INSTRUCTIONS (measured), its compatible branch differs there too
step "numerical tests on other kernels" env MKL_CBWR=COMPATIBLE MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
  ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p random_order --random-order -m "numerical and not vllm" "$@"
step "vllm tests" .venv-vllm/bin/python -m pytest -q -m vllm "$@"

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED step: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "every step passed" >&2
