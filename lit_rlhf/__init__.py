"""lit_rlhf: LLM alignment experiments (SFT, reward models, DPO, PPO, GRPO) as PyTorch Lightning modules."""

__version__ = "0.1.0"
