"""GRPO entry point: ``python -m lit_rlhf.experiments.grpo``.

With no arguments: SmolLM2-135M-Instruct + LoRA (r16, alpha 32, q/k/v/o) on the built-in arithmetic task
(2-digit addition/subtraction, "Answer with just the number." appended to each question), 30 steps of 8 prompts x 8
completions of at most 12 tokens, rewarded for the right number plus half the shaped closeness
``exp(-|pred - answer| / 10)``, on the CPU in under 15 minutes on 2 cores; the held-out greedy ``val/accuracy`` (64
questions never trained on) is printed at the start and the end.
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
TRAINER_DEFAULTS = {
    "max_steps": 30,
    "val_check_interval": 15,
    "check_val_every_n_epoch": None,
    "gradient_clip_val": None,
}
# The default experiment: short answers (a bare number fits in 12 tokens), so a CPU step takes seconds.
DEFAULTS = {
    "data.instruction": "Answer with just the number.",
    "model.sampling.max_new_tokens": 12,
    "data.max_val_records": 64,
}


def main(args=None):
    return run_stage(
        GRPOModule, PromptDataModule, "grpo", TRAINER_DEFAULTS, args=args, description=__doc__, defaults=DEFAULTS
    )


if __name__ == "__main__":
    main()
