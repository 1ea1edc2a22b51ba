#!/usr/bin/env bash
# Make the real vllm==0.33.0 importable in ./.venv-vllm, layered on ./.venv (idempotent: a second run only checks).
#
# For unit tests of dmo's vLLM glue against vLLM's public classes (LLM, SamplingParams, EngineArgs, LoRARequest,
# the v1 GPU Worker); no engine is ever started, so no GPU is needed. .venv-vllm sees everything in .venv (torch,
# transformers, dmo, lmms-eval) through a .pth file, and holds only vllm (installed --no-deps: its metadata pins
# torch==2.14.0, transformers<5.21 and a dozen CUDA kernel packages) plus the few deps that `import vllm` needs.
# First run: about a minute and ~1 GB (almost all of it vllm's own wheel, with its CUDA kernels).
#
#   bash scripts/install_vllm.sh                   # -> .venv-vllm/bin/python -c "import vllm"
#   VLLM_VENV=/elsewhere bash scripts/install_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.33.0}
[ -x .venv/bin/python ] || { echo "error: .venv missing; run bash scripts/setup.sh first" >&2; exit 1; }
if "$VENV/bin/python" -c "import sys, vllm; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
  exit 0
fi
# vLLM's own runtime requirements (version specs copied from its metadata) that importing the classes above needs
# and .venv lacks; the rest of its list is either in .venv already or only used by the server / GPU kernels.
DEPS=(
  cachetools cbor2 msgspec pybase64 py-cpuinfo partial-json-parser "pyzmq>=25.0.0" "prometheus_client>=0.18.0"
  "oss-harmony>=0.0.11" "xgrammar==0.2.8" "apache-tvm-ffi==0.1.11" "llguidance>=1.7.0,<1.8.0"
  "fastapi>=0.133.0,<0.137.0" "starlette>=1.0.1"
  uvloop  # comes in vLLM's list through fastapi[standard] -> uvicorn[standard]
)
echo "installing vllm $VLLM_VERSION into $VENV, layered on .venv (first time: about a minute, ~1 GB)" >&2
[ -x "$VENV/bin/python" ] || .venv/bin/python -m venv "$VENV"
base=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
own=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
# addsitedir (not a bare path line) so .venv's own .pth files run too: the editable dmo install lives in one.
echo "import site; site.addsitedir('$(cd "$base" && pwd)')" > "$own/_dmo_base_venv.pth"
for pkg in torch transformers; do  # pip must count them as installed, or it would fetch them again
  "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1 \
    || { echo "error: pip in $VENV does not see .venv's $pkg through $own/_dmo_base_venv.pth" >&2; exit 1; }
done
"$VENV/bin/python" -m pip install -q --upgrade pip
# A vllm wheel already downloaded into $VLLM_WHEELS is used instead of fetching it again; PyPI otherwise.
WHEELS=${VLLM_WHEELS:-/tmp/vllmwhl}
links=(); [ -d "$WHEELS" ] && links=(--find-links "$WHEELS")
"$VENV/bin/python" -m pip install -q "${DEPS[@]}"  # before vllm, so pip has no vllm pins to complain about
"$VENV/bin/python" -m pip install -q --no-deps "${links[@]}" "vllm==$VLLM_VERSION"
"$VENV/bin/python" -c "
import torch, vllm
from vllm import LLM, SamplingParams, EngineArgs
from vllm.lora.request import LoRARequest
from vllm.v1.worker.gpu_worker import Worker
from vllm.v1.engine.exceptions import EngineDeadError
assert vllm.__version__ == '$VLLM_VERSION', vllm.__version__
print(f'vllm {vllm.__version__} ready in $VENV (torch {torch.__version__} from .venv)')
" 2>&1 | grep -v -e '^W[0-9]' -e 'vllm._C' >&2
