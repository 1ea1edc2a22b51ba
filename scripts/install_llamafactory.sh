#!/usr/bin/env bash
# Install LLaMA-Factory 0.9.5 into its own venv, ./.venv-lf (idempotent: a second run only checks).
#
# LLaMA-Factory 0.9.5 pins transformers<=5.6, peft<=0.18.1 and datasets<=4.0, so it cannot share dmo's .venv;
# dmo only ever runs it as a separate program: `dmo train ... --lf-bin .venv-lf/bin/llamafactory-cli`.
# First run: a few minutes and ~6.6 GB (torch comes along). LLaMA-Factory imports torchaudio at start-up; the
# torchaudio pinned below loads beside the torch that pip picks here.
#
#   bash scripts/install_llamafactory.sh            # -> .venv-lf/bin/llamafactory-cli
#   LF_VENV=/elsewhere bash scripts/install_llamafactory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LF_VENV:-.venv-lf}
LF_VERSION=${LF_VERSION:-0.9.5}
TORCHAUDIO=${LF_TORCHAUDIO:-torchaudio==2.11.0}
stamp="$VENV/.dmo-lf-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "llamafactory==$LF_VERSION $TORCHAUDIO" ] \
  && "$VENV/bin/python" -c "import llamafactory" 2>/dev/null; then
  exit 0
fi
echo "installing LLaMA-Factory $LF_VERSION into $VENV (first time: a few minutes, ~6.6 GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "llamafactory==$LF_VERSION" "$TORCHAUDIO"
# The check LLaMA-Factory itself needs at start-up: its package, the training entry point, torchaudio.
"$VENV/bin/python" -c "import torchaudio, llamafactory; from llamafactory.hparams import get_train_args"
[ -x "$VENV/bin/llamafactory-cli" ] || { echo "error: $VENV/bin/llamafactory-cli missing after install" >&2; exit 1; }
echo "llamafactory==$LF_VERSION $TORCHAUDIO" > "$stamp"
echo "LLaMA-Factory ready: $VENV/bin/llamafactory-cli" >&2
