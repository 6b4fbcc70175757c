"""Reward-model entry point: ``python -m lit_rlhf.experiments.rm``.

With no arguments: SmolLM2-135M-Instruct + LoRA with a scalar score head on the last token, trained with the
Bradley–Terry loss on the built-in arithmetic preference pairs (right vs wrong answer), on the CPU, in under 10
minutes on 2 cores; held-out pairwise accuracy ``val/rewards/accuracies`` (questions never seen in training),
``val/rewards/{chosen,rejected,margins,mean}`` are printed at the start and the end. See
:mod:`lit_rlhf.stages.reward_model` for the losses and :mod:`lit_rlhf.reward_models` for the networks.

    python -m lit_rlhf.experiments.rm --config experiments/rm/tiny.yaml --output_dir runs/rm-tiny
    python -m lit_rlhf.experiments.rm --config experiments/rm/minilm.yaml      # BERT-style encoder backbone
    python -m lit_rlhf.experiments.rm --data.format=ranked                      # K-wise ranked lists
    python -m lit_rlhf.experiments.rm --data.path=prefs.jsonl --data.fields.prompt=question
    python -m lit_rlhf.experiments.rm --print_config > my.yaml                  # complete, re-runnable config
    sbatch slurm/train.sbatch rm --config experiments/rm/qwen2.5-0.5b.yaml

The export ``OUTPUT_DIR/export/merged`` loads with ``AutoModelForSequenceClassification.from_pretrained`` and is a
reward for the RL stages (reward function ``model_reward`` with ``path=OUTPUT_DIR/export/merged``).
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.scored import RewardDataModule
from lit_rlhf.stages.reward_model import RewardModule

TRAINER_DEFAULTS = {"max_steps": 100, "val_check_interval": 1000, "check_val_every_n_epoch": None}
LINKS = {"model.backbone.name": "data.tokenizer"}


def main(args=None):
    return run_stage(RewardModule, RewardDataModule, "rm", TRAINER_DEFAULTS, args=args, description=__doc__, links=LINKS)


if __name__ == "__main__":
    main()
