"""PPO entry point: ``python -m lit_rlhf.experiments.ppo``.

With no arguments: SmolLM2-135M-Instruct + LoRA (r16, alpha 32, q/k/v/o) on the built-in arithmetic prompts, scored by
the reward model of the RM stage's default run (``runs/rm/export/merged``; trained first, on the fly, when absent), with
a separate critic initialised from that reward model, on the CPU. Held-out ``val/score/mean`` and ``val/objective/kl``
(nats per completion) are printed at the start and the end. See :mod:`lit_rlhf.stages.ppo` for the algorithm.

    python -m lit_rlhf.experiments.ppo --config experiments/ppo/tiny.yaml --output_dir runs/ppo-tiny
    python -m lit_rlhf.experiments.ppo --config experiments/ppo/smollm2-rule.yaml             # rule reward, no RM
    python -m lit_rlhf.experiments.ppo --model.critic.init=shared_base                         # value head on the policy's base
    python -m lit_rlhf.experiments.ppo --model.kl.target=2.0                                   # adaptive KL coefficient
    python -m lit_rlhf.experiments.ppo --print_config > my.yaml                                # complete, re-runnable config
    sbatch slurm/train.sbatch ppo --config experiments/ppo/qwen2.5-0.5b-imdb.yaml
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.stages.ppo import PPOModule

TRAINER_DEFAULTS = {
    "max_steps": 32,  # PPO iterations (one rollout batch each)
    "val_check_interval": 1000,  # held-out metrics at the start and the end only
    "check_val_every_n_epoch": None,
    "gradient_clip_val": None,  # manual optimization: clipping is the module's max_grad_norm
}


def main(args=None):
    return run_stage(PPOModule, PromptDataModule, "ppo", TRAINER_DEFAULTS, args=args, description=__doc__)


if __name__ == "__main__":
    main()
