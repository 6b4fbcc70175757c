"""PPO entry point: ``python -m lit_rlhf.experiments.ppo``.

With no arguments: SmolLM2-135M-Instruct + LoRA (r16, alpha 32, q/k/v/o) on the built-in arithmetic prompts, 40 PPO
iterations of 8 prompts, rewarded by rules (``numeric_correctness`` + 0.5 x ``numeric_closeness``: partial credit for
a close number; -0.25 for a completion without EOS in 24 tokens), with the critic a value head on the policy's frozen
base through its own LoRA adapter (one copy of the model for actor, critic and reference), on the CPU in under 15
minutes on 2 cores. Held-out ``val/rewards/mean``, ``val/kl`` (nats per token) and ``val/kl_sequence`` (nats per
completion) are printed at the start and the end. See :mod:`lit_rlhf.stages.ppo` for the algorithm.

    python -m lit_rlhf.experiments.ppo --config experiments/ppo/smollm2-rm.yaml                # reward model (RM stage)
    python -m lit_rlhf.experiments.ppo --config experiments/ppo/tiny.yaml --output_dir runs/ppo-tiny
    python -m lit_rlhf.experiments.ppo --config experiments/ppo/smollm2-rule.yaml             # rule reward, no RM
    python -m lit_rlhf.experiments.ppo --model.critic.init=policy                              # separate critic model
    python -m lit_rlhf.experiments.ppo --model.kl.target=2.0                                   # adaptive KL coefficient
    python -m lit_rlhf.experiments.ppo --print_config > my.yaml  # complete, re-runnable config
    sbatch slurm/train.sbatch ppo --config experiments/ppo/qwen2.5-0.5b-imdb.yaml
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.stages.ppo import PPOModule

TRAINER_DEFAULTS = {
    "max_steps": 40,  # PPO iterations (one rollout batch each)
    "val_check_interval": 1000,  # held-out metrics at the start and the end only
    "check_val_every_n_epoch": None,
    "gradient_clip_val": None,  # manual optimization: clipping is the module's max_grad_norm
}


def main(args=None):
    return run_stage(PPOModule, PromptDataModule, "ppo", TRAINER_DEFAULTS, args=args, description=__doc__)


if __name__ == "__main__":
    main()
