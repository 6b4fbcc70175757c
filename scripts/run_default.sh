#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the default experiment: DPO on SmolLM2-135M + LoRA, built-in arithmetic task.
# Extra arguments go to the experiment, e.g. --output_dir runs/my-dpo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m lit_rlhf.experiments.dpo "$@"
