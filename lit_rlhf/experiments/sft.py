"""SFT entry point: ``python -m lit_rlhf.experiments.sft``.

With no arguments: SmolLM2-135M-Instruct + LoRA (r16, alpha 32, every linear layer) on the built-in arithmetic task
with worked digit-by-digit answers, on the CPU, in under 10 minutes on 2 cores; held-out greedy exact-match
``val/accuracy`` (64 questions never seen in training), ``val/loss``, ``val/token_accuracy`` and ``val/perplexity``
are printed at the start and the end. See :mod:`lit_rlhf.stages.sft` for the algorithm.

    python -m lit_rlhf.experiments.sft --config experiments/sft/tiny.yaml --output_dir runs/sft-tiny
    python -m lit_rlhf.experiments.sft --data.path=tests/fixtures/sft_nl2sql.jsonl --data.chat_template=false
    python -m lit_rlhf.experiments.sft --data.packing=true --data.max_length=256
    python -m lit_rlhf.experiments.sft --print_config > my.yaml                # complete, re-runnable config
    sbatch slurm/train.sbatch sft --config experiments/sft/qwen2.5-0.5b.yaml
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.stages.sft import SFTModule

TRAINER_DEFAULTS = {"max_steps": 120, "val_check_interval": 1000, "check_val_every_n_epoch": None}


def main(args=None):
    return run_stage(SFTModule, SFTDataModule, "sft", TRAINER_DEFAULTS, args=args, description=__doc__)


if __name__ == "__main__":
    main()
