"""Reward-model entry point: ``python -m lit_rlhf.experiments.rm``.

With no arguments: SmolLM2-135M-Instruct + LoRA (r 16, all linear layers) with a scalar score head on the last
non-pad token, trained with the Bradley–Terry loss for 50 steps of 8 pairs (lr 1e-3) on the built-in preference task
``arithmetic_worked_final`` (:func:`lit_rlhf.data.tasks.worked_preferences`, ``wrong="final"``): both responses
work "What is A + B?" digit by digit with correct steps ("Ones: 7 + 8 = 15, write 5 carry 1. Tens: 4 + 3 + 1 = 8."),
the chosen one ends with the result the steps give ("The answer is 85."), the rejected one with the DPO task's wrong
result ("The answer is 79."), so the reward model learns whether the stated answer follows from the work. Held-out
pairwise accuracy ``val/rewards/accuracies`` (64 pairs whose questions never occur in training) and
``val/rewards/{chosen,rejected,margins,mean}`` are printed at the start and the end; on the CPU (2 cores) it goes
from about 0.5 to >= 0.95 in under 10 minutes. The plain DPO pairs (``--data.task=arithmetic``: "The answer is 68."
vs "The answer is 71.") ask the reward model to do two-digit arithmetic itself and stay near chance accuracy at this
budget (README, "Default runs"); ``--data.task=arithmetic_worked`` makes the rejected answer reach its result through
a false one-digit step instead. See :mod:`lit_rlhf.stages.reward_model` for the losses and
:mod:`lit_rlhf.reward_models` for the networks.

    python -m lit_rlhf.experiments.rm --config experiments/rm/tiny.yaml --output_dir runs/rm-tiny
    python -m lit_rlhf.experiments.rm --config experiments/rm/minilm.yaml      # BERT-style encoder backbone
    python -m lit_rlhf.experiments.rm --data.format=ranked                      # K-wise ranked lists
    python -m lit_rlhf.experiments.rm --config experiments/rm/prm-smollm2.yaml  # process reward model (steps)
    python -m lit_rlhf.experiments.rm --data.path=prefs.jsonl --data.fields.prompt=question
    python -m lit_rlhf.experiments.rm --print_config > my.yaml                  # complete, re-runnable config
    sbatch slurm/train.sbatch rm --config experiments/rm/qwen2.5-0.5b.yaml

The export ``OUTPUT_DIR/export/merged`` loads with ``AutoModelForSequenceClassification.from_pretrained`` and is a
reward for the RL stages (reward function ``model_reward`` with ``path=OUTPUT_DIR/export/merged``).
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.scored import RewardDataModule
from lit_rlhf.stages.reward_model import RewardModule

TRAINER_DEFAULTS = {"max_steps": 50, "val_check_interval": 1000, "check_val_every_n_epoch": None}


def main(args=None):
    return run_stage(RewardModule, RewardDataModule, "rm", TRAINER_DEFAULTS, args=args, description=__doc__)


if __name__ == "__main__":
    main()
