"""On-policy distillation entry point: ``python -m lit_rlhf.experiments.distill``.

With no arguments (= ``experiments/distill/smollm2.yaml``): the student SmolLM2-135M-Instruct + LoRA (r16, alpha 32,
all linear layers) samples completions to the built-in arithmetic task's prompts and learns from the teacher
``runs/sft/export/merged`` (the SFT stage's export: run ``python -m lit_rlhf.experiments.sft`` first), which answers
with digit-by-digit worked steps ending in "The answer is N."; the student minimises only the full-vocabulary
per-token forward KL(teacher || student) on its own samples (``divergence: forward``, minibatches of 8). 30 steps of 8
prompts x 4 completions of at most 48 tokens, token-mean loss, lr 1e-3, on the CPU in ~14 minutes on 2 cores; the
student's held-out greedy ``val/accuracy`` (64 questions never trained on) is printed at the start and the end,
and ``train/distill/reverse_kl`` is logged each step. See :mod:`lit_rlhf.stages.distill` for the algorithm.

    python -m lit_rlhf.experiments.distill --config experiments/distill/tiny.yaml --output_dir runs/distill-tiny
    python -m lit_rlhf.experiments.distill --model.teacher.name=my/teacher
    python -m lit_rlhf.experiments.distill --model.divergence=jsd --model.jsd_beta=0.5              # GKD Eq. 1 JSD
    python -m lit_rlhf.experiments.distill --model.divergence=sampled --model.task_reward_weight=0.5   # GKD Eq. 5 mix
    python -m lit_rlhf.experiments.distill --print_config > my.yaml                       # complete, re-runnable config
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.stages.distill import DistillModule

# Manual optimization clips inside the module (model.max_grad_norm): the Trainer must not clip.
TRAINER_DEFAULTS = {
    "max_steps": 30,
    "val_check_interval": 15,
    "check_val_every_n_epoch": None,
    "gradient_clip_val": None,
}
# The default experiment: the SFT model's worked answers (instruction off), the token-mean full-vocabulary forward KL.
DEFAULTS = {
    "data.instruction": None,
    "data.max_val_records": 64,
    "data.val_batch_size": 64,
    "data.batch_size": 8,
    "model.policy.lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]},
    "model.num_generations": 4,
    "model.minibatch_size": 8,
    "model.divergence": "forward",
    "model.loss": "dapo",
    "model.optimizer.lr": 1.0e-3,
}


def main(args=None):
    return run_stage(
        DistillModule, PromptDataModule, "distill", TRAINER_DEFAULTS, args=args, description=__doc__, defaults=DEFAULTS
    )


if __name__ == "__main__":
    main()
