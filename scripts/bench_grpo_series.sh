#!/usr/bin/env bash
# One GRPO benchmark series (issue: vLLM rollout engine), run on a quiet machine, one job after the other:
# lit_rlhf with the kv_cache and vLLM samplers, fp32 and bf16-mixed, workloads G1 and G2; then TRL 1.16 (the shared
# harness, true fp32) without and with its vLLM colocate engine. Each run appends its JSON line to $OUT/series.jsonl
# and its full log to $OUT/<name>.log; failures are recorded, not fatal.
#   bash scripts/bench_grpo_series.sh [OUT]     # needs .venv-vllm (scripts/setup_vllm.sh), /tmp/bench-venv and
#                                               # /tmp/smol (../shared/trl-baseline/setup.sh), /tmp/bench-vllm-venv
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/runs/bench-series}"
HARNESS="$ROOT/../shared/trl-baseline/grpo.py"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
G1=(--model /tmp/smol/tiny --prompts 8 --gens 8 --max-completion 32 --temperature 1.0 --beta 0.04 --lr 1e-5 --steps 10)
G2=(--model /tmp/smol/hf --lora --lora-r 16 --lora-alpha 32 --prompts 4 --gens 4 --max-completion 48 --temperature 1.0
    --beta 0.04 --lr 1e-5 --steps 5)

run() {  # name, command...
  local name="$1"; shift
  local start; start=$(date -u +%H:%M:%S)
  if "$@" > "$OUT/$name.log" 2>&1; then status=ok; else status="failed (exit $?)"; fi
  local line; line=$(grep '^{' "$OUT/$name.log" | tail -1)
  echo "{\"run\": \"$name\", \"start\": \"$start\", \"end\": \"$(date -u +%H:%M:%S)\", \"status\": \"$status\", \"result\": ${line:-null}}" \
    >> "$OUT/series.jsonl"
  echo "$name: $status ($start - $(date -u +%H:%M:%S))"
}

cd "$ROOT"
for precision in 32-true bf16-mixed; do
  for workload in G1 G2; do
    for backend in kv_cache vllm; do
      run "ours-$workload-$backend-$precision" .venv-vllm/bin/python -m lit_rlhf.bench grpo --workload "$workload" \
        --rollout_backend "$backend" --precision "$precision"
    done
  done
done
run trl-G1-fp32 /tmp/bench-venv/bin/python "$HARNESS" --name grpo-tiny "${G1[@]}"
run trl-G2-fp32 /tmp/bench-venv/bin/python "$HARNESS" --name grpo-smol "${G2[@]}"
run trl-vllm-G1-fp32 /tmp/bench-vllm-venv/bin/python scripts/bench_trl_vllm.py --name grpo-tiny-vllm "${G1[@]}"
run trl-vllm-G2-fp32 /tmp/bench-vllm-venv/bin/python scripts/bench_trl_vllm.py --name grpo-smol-vllm "${G2[@]}"
