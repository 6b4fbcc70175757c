"""GRPO entry point: ``python -m lit_rlhf.experiments.grpo``.

With no arguments: SmolLM2-135M-Instruct + LoRA (r16, alpha 32, q/k/v/o) on the built-in arithmetic task
(2-digit addition/subtraction), rewarded for a correct final number plus a light bare-number format reward, on
the CPU in under 15 minutes on 2 cores; the held-out greedy ``val/accuracy`` is printed at the start and the end.
See :mod:`lit_rlhf.stages.grpo` for the algorithm.

    python -m lit_rlhf.experiments.grpo --config experiments/grpo/tiny.yaml --output_dir runs/grpo-tiny
    python -m lit_rlhf.experiments.grpo --model.loss=dapo --model.epsilon_high=0.28     # any knob from the command line
    python -m lit_rlhf.experiments.grpo --config experiments/grpo/from-sft.yaml          # start from the SFT export
    python -m lit_rlhf.experiments.grpo --print_config > my.yaml                          # complete, re-runnable config
    sbatch slurm/train.sbatch grpo --config experiments/grpo/qwen2.5-0.5b-gsm8k.yaml
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.stages.grpo import GRPOModule

# Manual optimization clips inside the module (model.max_grad_norm): the Trainer must not clip.
TRAINER_DEFAULTS = {"max_steps": 60, "val_check_interval": 30, "check_val_every_n_epoch": None, "gradient_clip_val": None}


def main(args=None):
    return run_stage(GRPOModule, PromptDataModule, "grpo", TRAINER_DEFAULTS, args=args, description=__doc__)


if __name__ == "__main__":
    main()
